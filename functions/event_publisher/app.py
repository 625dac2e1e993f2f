"""Event publisher: DynamoDB stream batches of status and health records, delivery events out."""

from __future__ import annotations

from typing import Any

from mailbroker.handlers import publisher as domain
from mailbroker.observability import logger, metrics, tracer


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler(capture_response=False)
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return domain.handle(event, context)
