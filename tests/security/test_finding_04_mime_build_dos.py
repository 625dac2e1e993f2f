"""Finding 4: one queued message could stall the sender past its timeout.

A 172 KB message with 500 recipients whose 200-character display names alternate ``é`` and a
space took about 37 s of CPU to build as MIME (the email package re-measures every encoded word
while folding an address list), before the id was claimed: it came back on every receive and
stalled its batch each time. Now the address headers have a budget (validation refuses the
message as ``invalid_message``), they are folded in one pass, and the sender checks the time left
after building as well as before. Work is measured by counting calls to the email package's
refolder, never by timing.
"""

from __future__ import annotations

import email
import email._header_value_parser as header_parser
import json
from email import policy

import pytest
from mailbroker.errors import InvalidMessage
from mailbroker.messages import delivery as delivery_module
from mailbroker.messages.mime import build_mime
from mailbroker.messages.models import MAX_ADDRESS_HEADER_BYTES, parse_message

NAME = ("é " * 100)[:200]


def reported_message() -> dict:
    """The reviewer's message: 500 recipients, 200-character names alternating 'é' and a space."""
    return {
        "integration": "support",
        "id": "f4-stall",
        "from": {"email": "support@contoso.com", "name": NAME},
        "to": [{"email": f"r{i:03d}@example.com", "name": NAME} for i in range(500)],
        "subject": "s",
        "text": "x" * 8000,
    }


def test_finding_4_the_reported_message_is_refused_before_any_mime_is_built():
    raw = json.dumps(reported_message(), ensure_ascii=False).encode()
    assert 165_000 < len(raw) < 180_000  # the reported size

    with pytest.raises(InvalidMessage) as refused:
        parse_message(raw)

    assert refused.value.code == "invalid_message"
    problems = {d["field"]: d["problem"] for d in refused.value.details}
    assert (
        f"more than {MAX_ADDRESS_HEADER_BYTES // 1024} KiB of addresses and display names" in problems["to"]
    )
    assert "split the recipients" in problems["to"]


@pytest.fixture
def refolds(monkeypatch):
    """How often the email package's general refolder runs (the work that grew per recipient)."""
    calls = []
    real = header_parser._refold_parse_tree

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(header_parser, "_refold_parse_tree", counting)
    return calls


def _message(recipients: int) -> dict:
    data = reported_message()
    data["to"] = [{"email": f"r{i:03d}@example.com", "name": NAME[:150]} for i in range(recipients)]
    data["cc"] = [{"email": "cc@example.com", "name": NAME[:150]}] * min(recipients, 50)
    return data


def test_finding_4_address_header_work_does_not_grow_with_recipients(refolds):
    small, large = parse_message(_message(1)), parse_message(_message(150))  # large is within budget

    build_mime(small, message_id_domain="contoso.com").as_bytes()
    work_for_one = len(refolds)
    refolds.clear()
    raw = build_mime(large, message_id_domain="contoso.com").as_bytes()

    assert len(refolds) == work_for_one  # no refolding per address: one pass over the words
    parsed = email.message_from_bytes(raw, policy=policy.default)

    def compact(name: str | None) -> str:  # RFC 2047 readers drop the space between encoded words
        return "".join((name or "").split())  # (the stdlib's reader keeps it): compare without spaces

    assert [(compact(a.display_name), a.addr_spec) for a in parsed["To"].addresses] == [
        (compact(a.name), a.email) for a in large.to
    ]
    assert compact(parsed["From"].addresses[0].display_name) == compact(NAME)
    assert max(len(line) for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")) <= 78


class _Context:
    function_name = "SenderFunction"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:SenderFunction"
    aws_request_id = "f4000000-0000-4000-8000-000000000001"

    def __init__(self) -> None:
        self.remaining = 90_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining


def test_finding_4_the_sender_checks_the_time_left_after_building(mail_pipeline, monkeypatch):
    """A build that uses up the invocation's time: the id is not claimed and nothing is sent;
    the record goes back on the queue and is delivered once later."""
    pipeline = mail_pipeline
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration)
    pipeline.post(message)
    context = _Context()
    real_build = delivery_module.build_mime

    def slow_build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        context.remaining = 1_000  # the build took the rest of the invocation
        return built

    monkeypatch.setattr(delivery_module, "build_mime", slow_build)
    from sender.app import lambda_handler

    event = pipeline.receive()
    answer = lambda_handler(event, context)

    assert [f["itemIdentifier"] for f in answer["batchItemFailures"]] == [event["Records"][0]["messageId"]]
    assert pipeline.delivered(message["id"]) == 0
    assert (pipeline.status(message["id"]) or {}).get("status") not in {"sending", "sent"}
    pipeline._waiting[event["Records"][0]["messageId"]] = event["Records"][0]["receiptHandle"]

    monkeypatch.setattr(delivery_module, "build_mime", real_build)
    pipeline.drive()

    assert pipeline.delivered(message["id"]) == 1


def test_finding_4_bcc_counts_too_the_http_transports_write_it_as_a_header(refolds):
    # Graph and the Gmail API read Bcc from the header: it is written, and folded, like To.
    hidden = _message(1)
    hidden["bcc"] = hidden.pop("to") + [{"email": f"b{i:03d}@example.com", "name": NAME} for i in range(499)]
    with pytest.raises(InvalidMessage) as refused:
        parse_message(hidden)
    assert refused.value.code == "invalid_message"

    within = _message(1)
    within["bcc"] = [{"email": f"b{i:03d}@example.com", "name": NAME[:150]} for i in range(150)]
    message = parse_message(within)
    build_mime(message, message_id_domain="contoso.com", bcc_header=False).as_bytes()
    work_without_bcc = len(refolds)
    refolds.clear()
    raw = build_mime(message, message_id_domain="contoso.com", bcc_header=True).as_bytes()

    assert len(refolds) == work_without_bcc
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert [a.addr_spec for a in parsed["Bcc"].addresses] == [a.email for a in message.bcc]
