"""``POST /v1/integrations/{id}/token``: a valid access token for an integration."""

from __future__ import annotations

import re
from typing import Annotated, Any

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body
from pydantic import BaseModel, ConfigDict

from mailbroker import runtime
from mailbroker.errors import MailbrokerError
from mailbroker.observability import metrics
from mailbroker.settings import TokenBrokerSettings, get_settings

router = Router()


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force_refresh: bool = False


_ASSUMED_ROLE = re.compile(r"^arn:(aws[\w-]*):sts::(\d{12}):assumed-role/([^/]+)/.+$")


def caller_principals(event: dict[str, Any]) -> set[str]:
    """The caller's ARN as API Gateway's IAM authoriser saw it, plus, for an assumed role, the
    role's own ARN (what an operator lists)."""
    arn = (event.get("requestContext", {}).get("authorizer", {}).get("iam", {}) or {}).get("userArn") or ""
    names = {arn} if arn else set()
    match = _ASSUMED_ROLE.match(arn)
    if match:
        partition, account, role = match.groups()
        names.add(f"arn:{partition}:iam::{account}:role/{role}")
    return names


@router.post("/v1/integrations/<integration_id>/token")
def issue_token(
    integration_id: str, request: Annotated[TokenRequest | None, Body()] = None
) -> dict[str, Any]:
    allowed = get_settings(TokenBrokerSettings).token_principals
    if allowed and not caller_principals(router.current_event.raw_event) & allowed:
        raise MailbrokerError(
            "the caller is not among the token route's allowed principals", code="caller_not_allowed"
        )
    force = bool(request and request.force_refresh)
    token = runtime.token_broker().token_for(integration_id, force_refresh=force)
    metrics.add_metric(name=f"TokenSource_{token.source}", unit="Count", value=1)
    return token.to_dict()
