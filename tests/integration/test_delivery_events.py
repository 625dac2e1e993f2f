"""Delivery events, from the record to the application: status and health records written to the
stack's tables on moto, the tables' streams read as the template's event source mappings read
them, the event publisher function, EventBridge, and a rule whose target is an SQS queue — the
queue an application would read."""

from __future__ import annotations

import importlib.util
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from mailbroker import runtime
from mailbroker.health import HealthError, HealthRecord, HealthStore
from mailbroker.messages.status import MessageStatusStore

from mailbroker_sandbox.aws import Stack, provision
from mailbroker_sandbox.events import LambdaContext
from mailbroker_sandbox.streams import EventInbox, StreamPoller

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_FIELDS = {"id", "integration", "status", "attempts", "at"}
OPTIONAL_FIELDS = {"code", "hint", "reply", "accepted", "refused", "url"}


class Publisher:
    """The function as Lambda runs it: functions/event_publisher/app.py's handler."""

    def __init__(self) -> None:
        path = ROOT / "functions" / "event_publisher" / "app.py"
        spec = importlib.util.spec_from_file_location("event_publisher_app_under_test", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.handler = module.lambda_handler
        self.invocations = 0

    def invoke(self, function: str, event: Any) -> Any:
        self.invocations += 1
        return self.handler(event, LambdaContext(function_name="EventPublisherFunction", timeout_seconds=30))


class EventsStack:
    def __init__(self, stack: Stack, bus: str, queue_url: str) -> None:
        self.stack = stack
        self.bus = bus
        self.inbox = EventInbox(stack.client("sqs"), queue_url)
        self.publisher = Publisher()
        self.poller = StreamPoller(
            self.publisher, "event_publisher", stack.function_settings("EventPublisherFunction"), stack.client
        )
        self.statuses = MessageStatusStore(
            stack.client("dynamodb"), stack.resources["MessageTable"], window_seconds=3600
        )
        self.health = HealthStore(stack.client("dynamodb"), stack.resources["TokenTable"])

    def events(self) -> list[dict[str, Any]]:
        self.poller.drain()
        return self.inbox.take(wait_seconds=1)


@pytest.fixture
def events_stack(
    moto_server: Any, template: dict[str, Any], aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[EventsStack]:
    """The template provisioned with its own bus and an SQS queue as the target of the template's
    delivery-events rule (EventBusName, EventsTargetArn), and the publisher's environment set."""
    suffix = uuid.uuid4().hex[:8]
    bus = f"mailbroker-events-{suffix}"
    boto3.client("events").create_event_bus(Name=bus)
    sqs = boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName=f"app-events-{suffix}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    stack = provision(
        template,
        endpoint_url=moto_server.endpoint_url,
        parameters={"EventBusName": bus, "EventsTargetArn": queue_arn},
    )
    for name, value in stack.function_env("EventPublisherFunction").items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    try:
        yield EventsStack(stack, bus, queue_url)
    finally:
        stack.delete()
        sqs.delete_queue(QueueUrl=queue_url)
        boto3.client("events").delete_event_bus(Name=bus)
        runtime.reset()


def detail_of(events: list[dict[str, Any]], detail_type: str, message_id: str) -> dict[str, Any]:
    found = [e for e in events if e["detail-type"] == detail_type and e["detail"]["id"] == message_id]
    assert len(found) == 1, (detail_type, message_id, events)
    event = found[0]
    assert event["source"] == "mailbroker"
    return dict(event["detail"])


def assert_contract(detail: dict[str, Any]) -> None:
    assert CONTRACT_FIELDS <= set(detail) <= CONTRACT_FIELDS | OPTIONAL_FIELDS, detail
    assert time.strptime(detail["at"], "%Y-%m-%dT%H:%M:%SZ")


def test_each_message_outcome_arrives_on_the_rules_sqs_target_as_the_contract_says(events_stack):
    s = events_stack
    sent = s.statuses.queue("order-1", "m365", None)
    sent = s.statuses.start_sending("order-1", "m365", sent, holder="env-1", lease_seconds=60)
    retry_error = {
        "code": "throttled",
        "message": "the server asked to slow down",
        "hint": "Wait; mailbroker retries with back-off.",
        "reply": "450 4.2.1 try later",
        "stage": "RCPT",
    }
    sent = s.statuses.retrying(
        "order-1", "m365", sent, error=retry_error, attempts=1, next_attempt_at=time.time() + 60
    )
    s.statuses.sent(
        "order-1",
        "m365",
        sent,
        reply="250 2.0.0 OK <q1>",
        refused=[{"recipient": "gone@example.com", "reply": "550 5.1.1 no such user"}],
    )
    failed = s.statuses.queue("invoice-2", "gmail", None)
    s.statuses.failed(
        "invoice-2",
        "gmail",
        failed,
        error={
            "code": "send_as_denied",
            "message": "m",
            "hint": "Grant SendAs.",
            "reply": "554 5.2.0 denied",
        },
        attempts=1,
    )
    uncertain = s.statuses.queue("receipt-3", "gmail", None)
    s.statuses.failed(
        "receipt-3",
        "gmail",
        uncertain,
        error={"code": "delivery_uncertain", "message": "connection lost", "hint": "Check the mailbox."},
        attempts=1,
    )

    events = s.events()

    assert len(events) == 4, events
    retrying = detail_of(events, "Message Retrying", "order-1")
    sent_detail = detail_of(events, "Message Sent", "order-1")
    failed_detail = detail_of(events, "Message Failed", "invoice-2")
    uncertain_detail = detail_of(events, "Message Delivery Uncertain", "receipt-3")
    for detail in (retrying, sent_detail, failed_detail, uncertain_detail):
        assert_contract(detail)
    assert {k: v for k, v in retrying.items() if k != "at"} == {
        "id": "order-1",
        "integration": "m365",
        "status": "retrying",
        "attempts": 1,
        "code": "throttled",
        "hint": "Wait; mailbroker retries with back-off.",
        "reply": "450 4.2.1 try later",
    }
    assert {k: v for k, v in sent_detail.items() if k != "at"} == {
        "id": "order-1",
        "integration": "m365",
        "status": "sent",
        "attempts": 2,
        "reply": "250 2.0.0 OK <q1>",
        "refused": [{"recipient": "gone@example.com", "reply": "550 5.1.1 no such user"}],
    }
    assert {k: v for k, v in failed_detail.items() if k != "at"} == {
        "id": "invoice-2",
        "integration": "gmail",
        "status": "failed",
        "attempts": 1,
        "code": "send_as_denied",
        "hint": "Grant SendAs.",
        "reply": "554 5.2.0 denied",
    }
    assert uncertain_detail["code"] == "delivery_uncertain"
    assert uncertain_detail["status"] == "failed"


def test_health_changes_arrive_once_per_transition(events_stack):
    s = events_stack
    now = time.time()
    first = s.health.put(
        HealthRecord(integration="m365", healthy=True, checked_at=now, provider="microsoft"),
        seen_version=None,
    )
    assert first is not None
    broken = s.health.put(
        HealthRecord(
            integration="m365",
            healthy=False,
            checked_at=now + 60,
            provider="microsoft",
            last_error=HealthError("token_invalid_client", "AADSTS7000215", "Renew the client secret."),
            consecutive_failures=1,
        ),
        seen_version=first.version,
    )
    assert broken is not None
    still_broken = s.health.put(
        HealthRecord(integration="m365", healthy=False, checked_at=now + 120, consecutive_failures=2),
        seen_version=broken.version,
    )
    assert still_broken is not None
    s.health.put(
        HealthRecord(integration="m365", healthy=True, checked_at=now + 180),
        seen_version=still_broken.version,
    )

    events = s.events()

    assert [e["detail"]["status"] for e in events] == ["unhealthy", "healthy"], events
    assert {e["detail-type"] for e in events} == {"Integration Health Changed"}
    unhealthy, healthy = (e["detail"] for e in events)
    assert_contract(unhealthy)
    assert {k: v for k, v in unhealthy.items() if k != "at"} == {
        "id": "m365",
        "integration": "m365",
        "status": "unhealthy",
        "attempts": 2,
        "code": "token_invalid_client",
        "hint": "Renew the client secret.",
    }
    assert healthy["attempts"] == 4  # the record's revision: consumers de-duplicate by it


def test_records_that_announce_nothing_never_reach_the_publisher(events_stack):
    s = events_stack
    record = s.statuses.queue("order-9", "m365", None)
    s.statuses.start_sending("order-9", "m365", record, holder="env-1", lease_seconds=60)
    s.stack.client("dynamodb").put_item(
        TableName=s.stack.resources["TokenTable"],
        Item={"pk": {"S": "token#abc"}, "version": {"N": "1"}, "sealed": {"S": "ciphertext"}},
    )

    outcome = s.poller.drain()

    assert (outcome.read, s.publisher.invocations) == (0, 0)
    assert s.inbox.take(wait_seconds=1) == []


def test_no_event_is_lost_when_publishing_fails_once(events_stack):
    """The bus is gone when the first record is published (PutEvents answers an error): the record
    is reported as a batch item failure, read again from the stream, and published once the bus
    is back — with the record written after it, in order, and nothing twice."""
    s = events_stack
    events_client = s.stack.client("events")
    rule_name = s.stack.resources["DeliveryEventsRule"].split("|", 1)[1]
    targets = events_client.list_targets_by_rule(Rule=rule_name, EventBusName=s.bus)["Targets"]
    events_client.remove_targets(Rule=rule_name, EventBusName=s.bus, Ids=[t["Id"] for t in targets])
    events_client.delete_rule(Name=rule_name, EventBusName=s.bus)
    events_client.delete_event_bus(Name=s.bus)
    record = s.statuses.queue("order-5", "m365", None)
    s.statuses.sent("order-5", "m365", record, reply="250 OK", refused=[])

    first = s.poller.poll_once()

    assert (first.read, first.invocations, first.failed) == (1, 1, 1)
    other = s.statuses.queue("order-6", "m365", None)
    s.statuses.failed(
        "order-6", "m365", other, error={"code": "smtp_permanent", "message": "m", "hint": "h"}, attempts=1
    )
    events_client.create_event_bus(Name=s.bus)
    events_client.put_rule(Name=rule_name, EventBusName=s.bus, EventPattern='{"source": ["mailbroker"]}')
    events_client.put_targets(Rule=rule_name, EventBusName=s.bus, Targets=targets)

    events = s.events()

    assert [(e["detail-type"], e["detail"]["id"]) for e in events] == [
        ("Message Sent", "order-5"),
        ("Message Failed", "order-6"),
    ]
