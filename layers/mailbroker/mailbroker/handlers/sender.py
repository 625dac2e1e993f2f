"""The sender function: an SQS batch in, partial batch failures out (``ReportBatchItemFailures``).

Each record goes through :class:`mailbroker.messages.delivery.Delivery`; a record that raises is
reported as failed and only that record returns to the queue. Records that failed for good have
already been moved to the dead-letter queue and are reported as done, so SQS deletes them.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response

from mailbroker import runtime
from mailbroker.messages.delivery import Delivery
from mailbroker.messages.queue import QueueActions
from mailbroker.messages.status import MessageStatusStore
from mailbroker.settings import Settings, get_settings


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    delivery = build_delivery(get_settings(), context)
    # Every record failing is still a partial answer: raising would also fail the records that
    # were dead-lettered on purpose, and count as a function error.
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    try:
        answer = process_partial_response(
            event=event, record_handler=delivery.handle_record, processor=processor, context=context
        )
        return dict(answer)
    finally:
        delivery.close()


def build_delivery(settings: Settings, context: Any = None) -> Delivery:
    sqs = runtime.aws_client("sqs")
    dynamodb = runtime.aws_client("dynamodb")
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return Delivery(
        statuses=MessageStatusStore(
            dynamodb, settings.message_table, window_seconds=settings.idempotency_hours * 3600
        ),
        queue=QueueActions(sqs, settings.send_queue_url, settings.dead_letter_queue_url),
        integrations=runtime.integration_store(),
        token_broker=runtime.token_broker(),
        governor=_governor(dynamodb, settings),
        max_message_age_seconds=settings.max_message_age_hours * 3600,
        remaining_ms=remaining if callable(remaining) else None,
    )


def _governor(dynamodb: Any, settings: Settings) -> Any:
    from mailbroker.governor import SendGovernor

    return SendGovernor(dynamodb, settings.message_table)
