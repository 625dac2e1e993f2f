"""Tracking: the open image and the click redirect, the HTTP API's two unauthenticated routes."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from mailbroker.handlers import tracking as domain
from mailbroker.observability import logger, metrics, tracer


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@metrics.log_metrics
@tracer.capture_lambda_handler(capture_response=False)
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return domain.handle(event, context)
