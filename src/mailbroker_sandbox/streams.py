"""The event publisher's DynamoDB stream event source mappings, and the operator's view of the
events it publishes.

``StreamPoller`` does what Lambda's event source mapping does for a DynamoDB stream, with the
settings the template gives it (``Stack.function_settings(...)["streams"]``): read each shard from
its starting position through moto's DynamoDB Streams API (DescribeStream, GetShardIterator,
GetRecords), drop the records the mapping's filter patterns do not match, invoke the function with
a batch in Lambda's event shape, and checkpoint after the records it processed: with
``ReportBatchItemFailures`` the batch is read again from the lowest failed sequence number, so a
record whose events could not be published is offered again, with those after it. A record that
keeps failing past ``MaximumRetryAttempts`` is described on the on-failure destination queue and
skipped, as Lambda does. (Bisecting a failing batch is left out: with partial batch responses it
changes only how many records are offered again.)

``EventInbox`` reads the SQS queue a rule's target delivers events to: what an application
subscribed to the bus receives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


class Invoker(Protocol):
    def invoke(self, function: str, event: Any) -> Any: ...


@dataclass
class _Shard:
    source: dict[str, Any]
    shard_id: str
    iterator: str | None
    pending: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0


@dataclass
class StreamOutcome:
    read: int = 0  # records that passed the filters
    invocations: int = 0
    failed: int = 0  # records reported in batchItemFailures (or in a batch whose invocation raised)
    discarded: int = 0  # records given up on and described on the on-failure destination


class StreamPoller:
    """Lambda's DynamoDB stream event source mappings of one function."""

    def __init__(self, invoker: Invoker, function: str, settings: dict[str, Any], client: Any) -> None:
        self.invoker = invoker
        self.function = function
        self.streams = client("dynamodbstreams")
        self.sqs = client("sqs")
        self.region = self.streams.meta.region_name
        self.shards: list[_Shard] = []
        for source in settings["streams"]:
            description = self.streams.describe_stream(StreamArn=source["stream_arn"])["StreamDescription"]
            for shard in description["Shards"]:
                iterator = self.streams.get_shard_iterator(
                    StreamArn=source["stream_arn"],
                    ShardId=shard["ShardId"],
                    ShardIteratorType=source["starting_position"],
                )["ShardIterator"]
                self.shards.append(_Shard(source, shard["ShardId"], iterator))

    def poll_once(self) -> StreamOutcome:
        """Read what is new on every shard and offer one batch per shard to the function."""
        outcome = StreamOutcome()
        for shard in self.shards:
            self._read(shard, outcome)
            if shard.pending:
                self._offer(shard, outcome)
        return outcome

    def drain(self, *, max_rounds: int = 50) -> StreamOutcome:
        """Poll until nothing is left to offer (or ``max_rounds``); the outcomes added up."""
        total = StreamOutcome()
        for _ in range(max_rounds):
            outcome = self.poll_once()
            for name in ("read", "invocations", "failed", "discarded"):
                setattr(total, name, getattr(total, name) + getattr(outcome, name))
            if not any(shard.pending for shard in self.shards) and outcome.read == 0:
                break
        return total

    def _read(self, shard: _Shard, outcome: StreamOutcome) -> None:
        if shard.iterator is None:
            return
        answer = self.streams.get_records(ShardIterator=shard.iterator, Limit=1000)
        shard.iterator = answer.get("NextShardIterator")
        arn = shard.source["stream_arn"]
        fresh = [_lambda_record(r, arn, self.region) for r in answer.get("Records", [])]
        fresh = [r for r in fresh if _passes(r, shard.source["filters"])]
        shard.pending.extend(fresh)
        outcome.read += len(fresh)

    def _offer(self, shard: _Shard, outcome: StreamOutcome) -> None:
        batch = shard.pending[: shard.source["batch_size"]]
        outcome.invocations += 1
        try:
            answer = self.invoker.invoke(self.function, {"Records": batch}) or {}
        except Exception:
            failed_from = 0
        else:
            partial = "ReportBatchItemFailures" in shard.source["function_response_types"]
            failed = {f["itemIdentifier"] for f in answer.get("batchItemFailures", [])} if partial else set()
            numbers = [r["dynamodb"]["SequenceNumber"] for r in batch]
            failed_from = min((numbers.index(n) for n in failed if n in numbers), default=len(batch))
        outcome.failed += len(batch) - failed_from
        del shard.pending[:failed_from]
        if failed_from == len(batch):
            shard.failures = 0
            return
        shard.failures = 1 if failed_from else shard.failures + 1
        limit = shard.source["maximum_retry_attempts"]
        if limit >= 0 and shard.failures > limit:
            self._give_up(shard, shard.pending.pop(0))
            shard.failures = 0
            outcome.discarded += 1

    def _give_up(self, shard: _Shard, record: dict[str, Any]) -> None:
        destination = shard.source["on_failure"]
        if not destination:
            return
        url = self.sqs.get_queue_url(QueueName=destination.rsplit(":", 1)[-1])["QueueUrl"]
        number = record["dynamodb"]["SequenceNumber"]
        self.sqs.send_message(
            QueueUrl=url,
            MessageBody=json.dumps(
                {
                    "requestContext": {"condition": "RetryAttemptsExhausted"},
                    "DDBStreamBatchInfo": {
                        "shardId": shard.shard_id,
                        "startSequenceNumber": number,
                        "endSequenceNumber": number,
                        "batchSize": 1,
                        "streamArn": shard.source["stream_arn"],
                    },
                }
            ),
        )


def _lambda_record(record: dict[str, Any], stream_arn: str, region: str) -> dict[str, Any]:
    """A GetRecords record in the shape Lambda hands the function."""
    change = dict(record["dynamodb"])
    created = change.get("ApproximateCreationDateTime")
    if isinstance(created, datetime):
        change["ApproximateCreationDateTime"] = int(created.timestamp())
    return {
        "eventID": record["eventID"],
        "eventName": record["eventName"],
        "eventVersion": record.get("eventVersion", "1.1"),
        "eventSource": "aws:dynamodb",
        "awsRegion": record.get("awsRegion", region),
        "dynamodb": change,
        "eventSourceARN": stream_arn,
    }


def _passes(record: dict[str, Any], patterns: list[dict[str, Any]]) -> bool:
    """Lambda event filtering: no pattern passes everything, else any one pattern must match."""
    return not patterns or any(_matches(record, pattern) for pattern in patterns)


def _matches(value: Any, pattern: Any) -> bool:
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            key in value and _matches(value[key], sub) for key, sub in pattern.items()
        )
    if isinstance(pattern, list):
        return any(_matches_one(value, allowed) for allowed in pattern)
    raise ValueError(f"unsupported filter pattern {pattern!r}")


def _matches_one(value: Any, allowed: Any) -> bool:
    if isinstance(allowed, dict):
        if set(allowed) == {"prefix"}:
            return isinstance(value, str) and value.startswith(allowed["prefix"])
        raise ValueError(f"unsupported filter operator {allowed!r}")
    return bool(value == allowed)


class EventInbox:
    """The SQS queue a rule delivers delivery events to."""

    def __init__(self, sqs: Any, queue_url: str) -> None:
        self.sqs = sqs
        self.queue_url = queue_url

    def take(self, *, wait_seconds: int = 0) -> list[dict[str, Any]]:
        """Every event waiting on the queue (removed from it), as EventBridge delivered it."""
        taken: list[dict[str, Any]] = []
        while True:
            answer = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=wait_seconds if not taken else 0,
            )
            messages = answer.get("Messages", [])
            if not messages:
                return taken
            taken.extend(json.loads(m["Body"]) for m in messages)
            self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )
