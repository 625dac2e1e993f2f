"""The sandbox's moto server leaves out emulator costs without changing an answer: a receive
checks retention from the queue's retention period alone, so it still drops a message past it, and
no longer counts the whole queue once per message it looks at."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sqs.models import Queue, SQSBackend, sqs_backends

from mailbroker_sandbox.moto_atomic import without_emulator_costs

REGION = "us-east-1"
MOTOS_CHECK = SQSBackend.is_message_valid_based_on_retention_period


@pytest.fixture
def sqs():
    with mock_aws(), without_emulator_costs():
        yield boto3.client("sqs", region_name=REGION)


def _queue(sqs, name: str, retention: int = 60) -> tuple[str, Queue]:
    url = sqs.create_queue(QueueName=name, Attributes={"MessageRetentionPeriod": str(retention)})["QueueUrl"]
    return url, sqs_backends[DEFAULT_ACCOUNT_ID][REGION].queues[name]


def test_retention_is_judged_as_moto_judges_it(sqs):
    url, queue = _queue(sqs, "retention")
    sqs.send_message(QueueUrl=url, MessageBody="old")
    sqs.send_message(QueueUrl=url, MessageBody="new")
    old, new = queue._messages
    old.sent_timestamp -= 61_000  # sent 61 s ago, with 60 s of retention
    backend = sqs_backends[DEFAULT_ACCOUNT_ID][REGION]

    assert SQSBackend.is_message_valid_based_on_retention_period is not MOTOS_CHECK
    for message, retained in ((old, False), (new, True)):
        assert backend.is_message_valid_based_on_retention_period("retention", message) is retained
        assert MOTOS_CHECK(backend, "retention", message) is retained


def test_a_receive_does_not_count_the_queue_once_per_message(sqs, monkeypatch):
    url, _ = _queue(sqs, "many")
    for start in range(0, 200, 10):
        sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": str(n), "MessageBody": f"m{start + n}"} for n in range(10)]
        )
    computed = []
    attributes = Queue.attributes
    monkeypatch.setattr(Queue, "attributes", property(lambda q: computed.append(q) or attributes.fget(q)))

    received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]

    assert len(received) == 10
    assert computed == []  # moto alone computes them (and counts the 200 messages) per message looked at


def test_leaving_the_block_restores_moto():
    from moto import backends

    check, modules = SQSBackend.is_message_valid_based_on_retention_period, backends.list_of_moto_modules
    with without_emulator_costs():
        assert SQSBackend.is_message_valid_based_on_retention_period is not check
        assert "sqs" in backends.list_of_moto_modules()
    assert SQSBackend.is_message_valid_based_on_retention_period is check
    assert backends.list_of_moto_modules is modules
