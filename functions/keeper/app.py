"""Keeper: exercise refresh tokens, health-check integrations, alert on transitions."""

from __future__ import annotations

from typing import Any

from mailbroker.handlers import keeper as domain
from mailbroker.observability import logger, metrics, tracer


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler(capture_response=False)
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return domain.handle(event, context)
