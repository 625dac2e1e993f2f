"""Token broker: direct invoke ``{"integration", "force_refresh"}`` and the HTTP API."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from mailbroker.handlers import token_broker as domain
from mailbroker.observability import logger, metrics, tracer


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@metrics.log_metrics
@tracer.capture_lambda_handler(capture_response=False)
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return domain.handle(event, context)
