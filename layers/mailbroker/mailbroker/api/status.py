"""``GET /v1/integrations/{id}/health`` and ``POST /v1/integrations/{id}/check``."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router

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
