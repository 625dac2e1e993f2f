"""The event publisher function: DynamoDB stream batches of status and health records in,
delivery events on EventBridge out, partial batch failures back (``ReportBatchItemFailures``).

A record whose events could not be put raises, so the batch reports it and the stream delivers it
(and those after it) again: an event is never lost once its record is written. Records that
announce nothing (``queued``, ``sending``, tokens, leases) succeed without a call.

Powertools' batch utility is imported by the first batch, not when the module is, as the sender
does: the function's cold start pays only for what answering Lambda needs.
"""

from __future__ import annotations

from typing import Any

from mailbroker import runtime
from mailbroker.events import events_for_change
from mailbroker.observability import logger, metrics
from mailbroker.settings import EventPublisherSettings, get_settings


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response

    publisher = runtime.event_publisher(get_settings(EventPublisherSettings))
    processor = BatchProcessor(event_type=EventType.DynamoDBStreams, raise_on_entire_batch_failure=False)

    def publish(record: Any) -> int:
        raw = record.raw_event if hasattr(record, "raw_event") else record
        events = events_for_change(raw)
        published = publisher.publish(events)
        for announced in events:
            logger.info(
                "delivery event published",
                extra={"detail_type": announced.detail_type, "id": announced.detail["id"]},
            )
        return published

    answer = process_partial_response(
        event=event, record_handler=publish, processor=processor, context=context
    )
    failed = len(answer.get("batchItemFailures", []))
    metrics.add_metric(name="EventRecordsFailed", unit="Count", value=failed)
    metrics.add_metric(name="EventRecordsRead", unit="Count", value=len(event.get("Records", [])))
    return dict(answer)
