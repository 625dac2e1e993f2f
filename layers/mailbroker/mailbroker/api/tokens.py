"""``POST /v1/integrations/{id}/token``: a valid access token for an integration."""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body
from pydantic import BaseModel, ConfigDict

from mailbroker import runtime
from mailbroker.callers import Caller
from mailbroker.errors import InvalidIntegration, MailbrokerError, UnknownIntegration
from mailbroker.observability import metrics
from mailbroker.settings import TokenBrokerSettings, get_settings

router = Router()


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force_refresh: bool = False


@router.post("/v1/integrations/<integration_id>/token")
def issue_token(
    integration_id: str, request: Annotated[TokenRequest | None, Body()] = None
) -> dict[str, Any]:
    check_token_caller(Caller.from_api_event(router.current_event.raw_event), integration_id)
    force = bool(request and request.force_refresh)
    token = runtime.token_broker().token_for(integration_id, force_refresh=force)
    metrics.add_metric(name=f"TokenSource_{token.source}", unit="Count", value=1)
    return token.to_dict()


def check_token_caller(caller: Caller, integration_id: str) -> None:
    """Tokens go only to a principal the stack's TokenApiPrincipals or the integration's
    ``allowed_callers`` names: nobody else, not even with execute-api:Invoke on the route. A caller
    named by neither learns nothing, not even whether the integration exists."""
    if caller.named_in(get_settings(TokenBrokerSettings).token_principals):
        return
    try:
        allowed = runtime.integration_store().get(integration_id).allowed_callers
    except (UnknownIntegration, InvalidIntegration):
        allowed = []
    if not caller.named_in(allowed):
        raise MailbrokerError(
            f"{caller.describe()} may not take tokens of integration {integration_id!r}",
            code="caller_not_allowed",
        )
