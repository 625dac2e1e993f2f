"""``POST /v1/integrations/{id}/token``: a valid access token for an integration."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body
from pydantic import BaseModel, ConfigDict

from mailbroker import runtime
from mailbroker.observability import metrics

router = Router()


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force_refresh: bool = False


@router.post("/v1/integrations/<integration_id>/token")
def issue_token(integration_id: str, request: Annotated[TokenRequest | None, Body()] = None) -> dict:
    force = bool(request and request.force_refresh)
    token = runtime.token_broker().token_for(integration_id, force_refresh=force)
    metrics.add_metric(name=f"TokenSource_{token.source}", unit="Count", value=1)
    return token.to_dict()
