"""What a failing store does to a message in the sender: AWS trouble is an outage (the message is
put back and sent once AWS answers again); a bug is not (the message fails at once as
``internal_error``, dead-lettered with its traceback logged, and is sent once an operator
re-drives it).

Real peers on loopback: the template's queues and tables on moto server, the sandbox token
endpoints and SMTP server, the real sender handler (``mail_pipeline``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

from mailbroker import runtime

FIRST_RETRY = range(54, 67)  # the retry schedule's first step: 60 s ± 10 %


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def sender_logs() -> Iterator[Recorder]:
    from mailbroker.observability import logger

    recorder = Recorder()
    logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        logger._logger.removeHandler(recorder)


def raise_inside(operation: str, error: Exception, *, times: int = 1, containing: str = "") -> None:
    """The sender's next ``times`` DynamoDB ``operation`` calls (whose update expression contains
    ``containing``) raise ``error`` from inside the call, as a bug in code it runs would."""
    remaining = [times]

    def hook(params: dict[str, Any], **kwargs: Any) -> None:
        if remaining[0] > 0 and containing in params.get("UpdateExpression", ""):
            remaining[0] -= 1
            raise error

    # before-parameter-build: inside the client call, with the request's parameters as given.
    runtime.aws_client("dynamodb").meta.events.register(f"before-parameter-build.dynamodb.{operation}", hook)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_bug_in_a_store_fails_the_message_at_once_and_a_redrive_sends_it(mail_pipeline):
    p = mail_pipeline
    message = p.message(p.add("microsoft"))
    p.post(message)
    message_id = message["id"]
    # The claim of the id (status ``sending``): one UpdateItem, after the governor's writes.
    raise_inside(
        "UpdateItem", TypeError("unsupported operand type(s) for +: 'int' and 'str'"), containing=":sending"
    )

    with sender_logs() as logs:
        put_back = p.round()

    assert put_back == []  # not left on the queue to be retried
    assert p.delays() == []  # no visibility change: no retry was scheduled
    assert p.delivered(message_id) == 0
    status = p.status(message_id)
    assert status["status"] == "failed"
    assert status["last_error"]["code"] == "internal_error"
    letter = p.dead_letters()[message_id]
    assert letter["error_code"] == "internal_error"
    assert "Re-drive" in letter["error_hint"]
    assert sum(p.queue_depth()) == 0
    [logged] = [r for r in logs.records if r.getMessage() == "unexpected failure delivering a message"]
    assert logged.exc_info is not None and logged.exc_info[0] is TypeError

    p.redrive(message_id)
    p.drive()

    assert p.delivered(message_id) == 1
    assert p.status(message_id)["status"] == "sent"


def test_dynamodb_out_of_reach_is_an_outage_the_message_waits_out(mail_pipeline):
    p = mail_pipeline
    message = p.message(p.add("microsoft"))
    p.post(message)
    message_id = message["id"]
    p.setenv("AWS_ENDPOINT_URL_DYNAMODB", f"http://127.0.0.1:{closed_port()}")

    put_back = p.round()

    assert len(put_back) == 1
    assert [d in FIRST_RETRY for d in p.delays()] == [True]
    assert p.dead_letters() == {}
    assert sum(p.queue_depth()) == 1

    p.monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB")
    p.new_environment()  # DynamoDB answers again
    p.drive()

    assert p.delivered(message_id) == 1
    assert p.status(message_id)["status"] == "sent"
    assert p.dead_letters() == {}


def test_sent_records_dynamodb_refuses_to_write_leave_the_messages_sent_once(mail_pipeline):
    from botocore.exceptions import ClientError

    p = mail_pipeline
    integration = p.add("microsoft")
    messages = [p.message(integration) for _ in range(3)]
    for message in messages:
        p.post(message)
    throttled = ClientError(
        {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"}},
        "BatchWriteItem",
    )
    raise_inside("BatchWriteItem", throttled, times=3)  # the write and any retry of it

    with sender_logs() as logs:
        put_back = p.round()

    # The server has every message: none is put back, so none is sent again.
    assert put_back == []
    assert sum(p.queue_depth()) == 0
    assert [p.delivered(m["id"]) for m in messages] == [1, 1, 1]
    unrecorded = [
        r for r in logs.records if r.getMessage() == "message sent but its status could not be recorded"
    ]
    assert sorted(r.message_id for r in unrecorded) == sorted(m["id"] for m in messages)
    # Their records still say `sending`: a copy that comes back is never sent again.
    assert {p.status(m["id"])["status"] for m in messages} == {"sending"}
