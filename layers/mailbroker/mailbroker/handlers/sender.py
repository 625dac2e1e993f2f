"""The sender function: an SQS batch in, partial batch failures out (``ReportBatchItemFailures``).

Each record goes through :class:`mailbroker.messages.delivery.Delivery`; a record that raises is
reported as failed and only that record returns to the queue. Records that failed for good have
already been moved to the dead-letter queue and are reported as done, so SQS deletes them.

Powertools' batch utility and the delivery flow (pydantic models, MIME, the governor) are
imported by the first batch, not when the module is: the function's cold start pays only for
what answering Lambda needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailbroker import runtime
from mailbroker.settings import SenderSettings, get_settings

if TYPE_CHECKING:
    from mailbroker.messages.delivery import Delivery

LEASE_MARGIN_SECONDS = 60.0


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response

    delivery = build_delivery(get_settings(SenderSettings), context)
    delivery.expect(event.get("Records") or [])
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


def build_delivery(settings: SenderSettings, context: Any = None) -> Delivery:
    from mailbroker.messages.delivery import DEFAULT_LEASE_SECONDS, Delivery

    remaining = getattr(context, "get_remaining_time_in_millis", None)
    remaining = remaining if callable(remaining) else None
    # Claims and connection slots outlive this invocation by a margin, no more: a sender that
    # crashes frees them a minute after its timeout instead of holding them for minutes.
    lease = remaining() / 1000 + LEASE_MARGIN_SECONDS if remaining else DEFAULT_LEASE_SECONDS
    return Delivery(
        statuses=runtime.status_store(settings),
        queue=runtime.queue_actions(settings),
        integrations=runtime.integration_store(),
        token_broker=runtime.token_broker(),
        governor=runtime.send_governor(settings),
        max_message_age_seconds=settings.max_message_age_hours * 3600,
        remaining_ms=remaining,
        lease_seconds=lease,
        tracker=runtime.link_tracker(settings),
        idle_sessions=runtime.idle_sessions(settings.smtp_idle_seconds),
        api_sender_id=settings.api_sender_role_id,
    )
