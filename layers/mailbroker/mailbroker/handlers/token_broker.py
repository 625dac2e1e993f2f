"""The token broker function's two entry shapes: direct invoke and API Gateway HTTP API v2."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mailbroker import runtime
from mailbroker.errors import InvalidRequest, MailbrokerError, classify_exception
from mailbroker.observability import logger, metrics
from mailbroker.settings import TokenBrokerSettings, get_settings

if TYPE_CHECKING:
    from aws_lambda_powertools.event_handler import APIGatewayHttpResolver


class DirectInvoke(BaseModel):
    model_config = ConfigDict(extra="forbid")
    integration: str = Field(min_length=1, max_length=128)
    force_refresh: bool = False


@lru_cache(maxsize=1)
def _resolver() -> APIGatewayHttpResolver:
    from mailbroker.api.resolver import build_resolver

    return build_resolver()


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    get_settings(TokenBrokerSettings)  # a missing variable fails here, named, before any call
    if isinstance(event, dict) and "requestContext" in event and "routeKey" in event:
        return _resolver().resolve(event, context)
    return direct_invoke(event)


def direct_invoke(event: object) -> dict[str, Any]:
    """``{"integration": id, "force_refresh": false}`` → the token JSON, or ``{"error": {...}}``
    without raising."""
    try:
        request = DirectInvoke.model_validate(event)
    except ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(event)", "problem": e["msg"]}
            for e in exc.errors(include_input=False, include_url=False)
        ]
        invalid = InvalidRequest(
            'the event must be {"integration": "<id>", "force_refresh": false}',
            details=details,
            hint="Fix the fields listed in 'details'.",
        )
        return {"error": invalid.to_dict()}
    try:
        token = runtime.token_broker().token_for(request.integration, force_refresh=request.force_refresh)
    except Exception as exc:
        error = classify_exception(exc)
        if not isinstance(exc, MailbrokerError):
            logger.exception("token request failed", extra={"integration": request.integration})
        metrics.add_metric(name="TokenErrors", unit="Count", value=1)
        return {"error": error.to_dict()}
    metrics.add_metric(name=f"TokenSource_{token.source}", unit="Count", value=1)
    return token.to_dict()
