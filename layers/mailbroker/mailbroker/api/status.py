"""``GET /v1/integrations/{id}/health``, ``POST /v1/integrations/{id}/check`` and
``POST /v1/integrations/{id}/test``."""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body
from pydantic import BaseModel, ConfigDict, Field

from mailbroker import runtime
from mailbroker.errors import NotFound
from mailbroker.settings import TokenBrokerSettings, get_settings

router = Router()


@router.get("/v1/integrations/<integration_id>/health")
def integration_health(integration_id: str) -> Response[dict[str, Any]]:
    """The keeper's last health record of the integration."""
    record = runtime.health_store(get_settings(TokenBrokerSettings)).get(integration_id)
    if record is not None:
        return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=record.to_dict())
    runtime.integration_store().get(integration_id)  # unknown_integration (404) when there is none
    raise NotFound(
        f"no health record for {integration_id!r} yet",
        hint="The keeper writes one on its next scheduled run; POST "
        f"/v1/integrations/{integration_id}/check runs a live check now.",
    )


@router.post("/v1/integrations/<integration_id>/check")
def integration_check(integration_id: str) -> dict[str, Any]:
    """A live check: token, then TCP/TLS, EHLO, STARTTLS, AUTH and QUIT. No mail is sent."""
    from mailbroker.keeper import live_check

    integration = runtime.integration_store().get(integration_id, force_fetch=True)
    steps = live_check(integration, runtime.token_broker())
    return {
        "integration": integration_id,
        "ok": all(step.ok for step in steps),
        "steps": [step.to_dict() for step in steps],
    }


class TestMailRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(min_length=3, max_length=254)


@router.post("/v1/integrations/<integration_id>/test")
def integration_test_mail(
    integration_id: str, request: Annotated[TestMailRequest, Body()]
) -> Response[dict[str, Any]]:
    """A real test mail to ``to`` through the whole path: 202 ``{"id"}``; 404 ``unknown_integration``."""
    from mailbroker.messages.testmail import send_test_mail

    settings = get_settings(TokenBrokerSettings)
    integrations = runtime.integration_store()
    queue = runtime.message_queue(settings, runtime.status_store(settings), integrations)
    answer = send_test_mail(queue, integrations, integration_id, request.to)
    return Response(status_code=202, content_type=content_types.APPLICATION_JSON, body=answer)
