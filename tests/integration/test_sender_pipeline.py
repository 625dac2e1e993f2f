"""The sender pipeline against real peers on loopback: the moto server holding the template's
queues and tables, the sandbox token endpoints, and the sandbox SMTP server with STARTTLS and
XOAUTH2. Every test calls the real handler (``sender.app.lambda_handler``) with SQS events built
from messages actually received from the send queue, then acts as the event source mapping does:
records the handler reports as done are deleted, failed ones stay with the visibility the handler
gave them.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import email
import json
import time
from collections.abc import Iterator
from email import policy
from typing import Any

import pytest
from mailbroker import runtime
from mailbroker.messages.mime import build_mime
from mailbroker.messages.models import parse_message
from mailbroker.messages.received import put_back_delay
from mailbroker.messages.sessions import (
    IDLE_LEASE_MARGIN_SECONDS,
    PARK_RENEWAL_SLACK_SECONDS,
    SERVER_IDLE_SECONDS,
)

from tests.fixtures.events import context
from tests.fixtures.pipeline import MailPipeline, start_pipeline

SENDER = "support@contoso.com"
ALIAS = "sales@contoso.com"
# Planted credentials: none of them may appear in anything the pipeline writes.
CLIENT_SECRET = "planted-client-secret-5b1e9c"
PASSWORD = "planted-smtp-password-91c2d7"
ONE_MINUTE = (54, 66)  # the first retry: 60 s ± 10 %


# --------------------------------------------------------------------------------------- harness


@pytest.fixture
def pipeline(
    stack: Any,
    aws_env: dict[str, str],
    fresh_token_server: Any,
    ca_trust_env: dict[str, str],
    smtp_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[MailPipeline]:
    """The shared harness with the providers' own limits, tokens verified by HTTPS introspection."""
    p = start_pipeline(
        stack,
        fresh_token_server,
        smtp_server,
        monkeypatch,
        token_timeout=2,
        gate_tokens=False,
        default_limits={},
        client_secret=CLIENT_SECRET,
        password=PASSWORD,
    )
    yield p
    p.drain()
    runtime.reset()


# ------------------------------------------------------------------------------------- delivery


def test_queued_message_is_delivered_byte_for_byte_as_built_from_its_json(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration)
    pipeline.post(message)
    event = pipeline.receive()

    failed = pipeline.run(event)

    assert failed == []
    [accepted] = pipeline.smtp.accepted
    queued_at = int(event["Records"][0]["attributes"]["SentTimestamp"]) / 1000
    expected = build_mime(
        parse_message(json.dumps(message)),
        message_id_domain="contoso.com",
        now=dt.datetime.fromtimestamp(queued_at, dt.UTC),
    ).as_bytes()
    assert accepted.data == expected
    assert accepted.mail_from == SENDER
    assert accepted.rcpt_tos == ["ana@example.com", "bo@example.com"]
    status = pipeline.status(message["id"])
    assert status["status"] == "sent"
    assert status["reply"] == f"250 2.0.0 OK <{accepted.queue_id}>"
    assert status["attempts"] == 1
    assert pipeline.queue_depth() == (0, 0)
    assert pipeline.dead_letter_messages() == []


@pytest.mark.parametrize(
    ("given", "expected_from"),
    [
        (None, "Help Desk <support@contoso.com>"),  # no from: the integration's default sender
        ("support@contoso.com", "Help Desk <support@contoso.com>"),  # the sender entry's name
        ({"email": "support@contoso.com", "name": "Ana"}, "Ana <support@contoso.com>"),  # the message's own
    ],
)
def test_from_and_its_display_name_follow_the_integrations_senders(
    pipeline: MailPipeline, given: Any, expected_from: str
) -> None:
    integration = pipeline.add("basic", senders=[{"email": SENDER, "name": "Help Desk"}])
    message = pipeline.message(integration, **{"from": given})

    assert pipeline.deliver(message) == []

    [accepted] = pipeline.smtp.accepted
    assert accepted.mail_from == SENDER
    assert email.message_from_bytes(accepted.data, policy=policy.default)["From"] == expected_from
    assert pipeline.status(message["id"])["status"] == "sent"


@pytest.mark.parametrize(
    ("provider", "mechanism"),
    [
        ("microsoft", "XOAUTH2"),
        ("google", "XOAUTH2"),
        ("google_service_account", "XOAUTH2"),
        ("oauth2", "XOAUTH2"),
        ("basic", "PLAIN"),
    ],
)
def test_each_provider_type_authenticates_and_delivers(
    pipeline: MailPipeline, provider: str, mechanism: str
) -> None:
    integration = pipeline.add(provider)
    message = pipeline.message(integration)

    assert pipeline.deliver(message) == []

    [accepted] = pipeline.smtp.accepted
    assert (accepted.auth_user, accepted.mechanism) == (SENDER, mechanism)
    assert pipeline.status(message["id"])["status"] == "sent"


def test_html_text_attachments_and_unicode_arrive_intact(pipeline: MailPipeline) -> None:
    integration = pipeline.add("google")
    pdf = bytes(range(256)) * 40
    message = pipeline.message(
        integration,
        **{"from": {"email": SENDER, "name": "Équipe Support — Zoë"}},
        to=[{"email": "juergen@bücher.example", "name": "Jürgen Größe"}],
        subject="Ihre Bestellung 📦 ist unterwegs — 注文",
        text="Grüße aus Köln!\nZeile zwei — mit Gedankenstrich.\n",
        html="<p>Grüße aus <b>Köln</b> 🚚</p>",
        attachments=[
            {
                "filename": "rechnung.pdf",
                "content_type": "application/pdf",
                "content": base64.b64encode(pdf).decode(),
            },
            {
                "filename": "notiz.txt",
                "content_type": "text/plain",
                "content": base64.b64encode(b"hi\n").decode(),
            },
        ],
    )

    assert pipeline.deliver(message) == []

    [accepted] = pipeline.smtp.accepted
    assert accepted.data.isascii()  # RFC 2047 words, quoted-printable and base64: no SMTPUTF8 needed
    assert "SMTPUTF8" not in accepted.mail_options
    received = email.message_from_bytes(accepted.data, policy=policy.default)
    assert received["Subject"] == message["subject"]
    assert received["From"].addresses[0].display_name == "Équipe Support — Zoë"
    assert received["To"].addresses[0].display_name == "Jürgen Größe"
    assert accepted.rcpt_tos == ["juergen@xn--bcher-kva.example"]
    assert received.get_body(("plain",)).get_content().replace("\r\n", "\n") == message["text"]
    assert received.get_body(("html",)).get_content().strip() == message["html"]
    attachments = {part.get_filename(): part.get_content() for part in received.iter_attachments()}
    assert attachments == {"rechnung.pdf": pdf, "notiz.txt": "hi\n"}


def test_non_ascii_mailbox_name_is_sent_with_smtputf8(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration, to=["josé@example.com"])

    assert pipeline.deliver(message) == []

    [accepted] = pipeline.smtp.accepted
    assert accepted.rcpt_tos == ["josé@example.com"]
    assert "SMTPUTF8" in accepted.mail_options


def test_partially_refused_recipients_are_recorded_and_the_others_get_the_message(
    pipeline: MailPipeline,
) -> None:
    integration = pipeline.add("microsoft")
    pipeline.smtp.fail("rcpt", 550, "5.1.1 User unknown", recipient="bo@example.com")
    message = pipeline.message(integration)

    assert pipeline.deliver(message) == []

    [accepted] = pipeline.smtp.accepted
    assert accepted.rcpt_tos == ["ana@example.com"]
    status = pipeline.status(message["id"])
    assert status["status"] == "sent"
    assert status["refused"] == [{"recipient": "bo@example.com", "reply": "550 5.1.1 User unknown"}]
    assert pipeline.dead_letter_messages() == []


# ---------------------------------------------------------------------------------- idempotency


def test_a_redelivered_sqs_message_is_not_sent_twice(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration)
    pipeline.post(message)
    event = pipeline.receive()
    from sender.app import lambda_handler

    first = lambda_handler(event, context())  # the delete after it is lost: SQS redelivers
    second = pipeline.run(event)

    assert first["batchItemFailures"] == [] and second == []
    assert len(pipeline.smtp.accepted) == 1
    assert pipeline.status(message["id"])["attempts"] == 1


def test_the_same_id_posted_twice_is_delivered_once(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration)

    in_one_batch = pipeline.deliver(message, message)
    in_a_later_batch = pipeline.deliver(message)

    assert in_one_batch == [] and in_a_later_batch == []
    assert len(pipeline.smtp.accepted) == 1
    assert pipeline.status(message["id"])["status"] == "sent"
    assert pipeline.queue_depth() == (0, 0)


def test_a_message_without_id_is_tracked_under_its_sqs_message_id(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    sqs_id = pipeline.post(pipeline.message(integration, id=None))

    assert pipeline.run(pipeline.receive()) == []

    assert pipeline.status(sqs_id)["status"] == "sent"
    [accepted] = pipeline.smtp.accepted
    assert build_mime_id(sqs_id) in accepted.data.decode()


def build_mime_id(message_id: str) -> str:
    from mailbroker.messages.mime import message_id_for

    return message_id_for(message_id, "contoso.com")


def test_a_claim_whose_sender_vanished_fails_as_delivery_uncertain_and_is_not_resent(
    pipeline: MailPipeline,
) -> None:
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration)
    # A sender claimed the id and died without recording the outcome.
    pipeline.statuses.start_sending(message["id"], integration, None, holder="gone", lease_seconds=0.05)
    time.sleep(0.1)

    assert pipeline.deliver(message) == []

    assert pipeline.smtp.accepted == []
    assert pipeline.status(message["id"])["last_error"]["code"] == "delivery_uncertain"
    [letter] = pipeline.dead_letter_messages()
    assert letter["attributes"]["error_code"] == "delivery_uncertain"


def test_a_copy_of_an_id_another_sender_is_sending_waits_for_the_claim_to_end(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration)
    pipeline.statuses.start_sending(message["id"], integration, None, holder="busy", lease_seconds=120)

    failed = pipeline.deliver(message)

    assert len(failed) == 1
    assert pipeline.smtp.accepted == []
    assert 115 <= pipeline.delays()[0] <= 122
    assert pipeline.status(message["id"])["status"] == "sending"


# -------------------------------------------------------------------------------------- batches


def test_a_batch_of_ten_to_one_integration_uses_one_connection_and_one_auth(pipeline: MailPipeline) -> None:
    # Limits above the batch, so the governor lets all ten through at once.
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600})
    messages = [pipeline.message(integration) for _ in range(10)]

    assert pipeline.deliver(*messages) == []

    assert len(pipeline.smtp.accepted) == 10
    assert pipeline.smtp.connections == 1
    assert pipeline.smtp.auth_attempts == 1
    assert pipeline.tokens.issued(client_id=f"client-{integration}") == 1
    assert all(pipeline.status(m["id"])["status"] == "sent" for m in messages)


def test_a_queued_batch_of_ten_costs_at_most_three_dynamodb_requests_a_message(
    pipeline: MailPipeline,
) -> None:
    # Given ten messages queued as the API queues them (a "queued" record each), tokens warm,
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600})
    messages = [pipeline.message(integration) for _ in range(10)]
    for m in messages:
        pipeline.statuses.queue(m["id"], integration, None)
    runtime.token_broker().token_for(integration)
    requests: list[str] = []
    runtime.aws_client("dynamodb").meta.events.register(
        "before-call.dynamodb", lambda model, **_: requests.append(model.name), unique_id="count"
    )

    # when the sender delivers them in one batch,
    assert pipeline.deliver(*messages) == []

    # then each was claimed in one write and the ten recorded `sent` in one request; the pace cost
    # one write, and the connection slot a read and a write (and a release), for the whole batch.
    assert len(pipeline.smtp.accepted) == 10
    assert all(pipeline.status(m["id"])["status"] == "sent" for m in messages)
    assert len(requests) <= 29, requests
    assert requests.count("GetItem") == 1  # the connection slot
    assert (requests.count("BatchWriteItem"), requests.count("PutItem")) == (1, 0)


def test_a_second_copy_in_the_batch_that_sent_the_first_is_a_duplicate(pipeline: MailPipeline) -> None:
    # The batch writes its `sent` records together at its end, but not after a copy of one of
    # them is claimed: that copy must find the record `sent`, not `sending` under a live lease.
    integration = pipeline.add("microsoft")
    message, other = pipeline.message(integration), pipeline.message(integration)

    assert pipeline.deliver(message, other, message) == []  # nothing put back

    assert pipeline.delivered(message["id"]) == 1
    assert pipeline.delivered(other["id"]) == 1
    assert pipeline.status(message["id"])["status"] == "sent"
    assert pipeline.status(other["id"])["status"] == "sent"
    assert pipeline.delays() == []


def test_a_second_copy_that_fails_before_its_claim_still_finds_the_first_sent(pipeline: MailPipeline) -> None:
    # The same id again in the batch, this time from a sender the integration does not allow: it
    # fails before its claim, reads the record then, and must find the first copy's `sent`.
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration)
    altered = {**message, "from": {"email": "ceo@contoso.com"}}

    assert pipeline.deliver(message, altered) == []

    assert pipeline.delivered(message["id"]) == 1
    assert pipeline.status(message["id"])["status"] == "sent"
    assert message["id"] not in pipeline.dead_letters()  # a duplicate, not a failure


def test_places_in_the_pace_the_batch_did_not_use_are_given_back(pipeline: MailPipeline) -> None:
    # Given an integration at 30 a minute (a full bucket: a burst of 3) and two ids already sent,
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 30})
    duplicates = [pipeline.message(integration) for _ in range(2)]
    for m in duplicates:
        claimed = pipeline.statuses.start_sending(m["id"], integration, None, holder="x", lease_seconds=60)
        pipeline.statuses.sent(m["id"], integration, claimed, reply="250 ok", refused=[])

    # when one batch brings a new message and copies of the two sent ones,
    before = time.time()
    assert pipeline.deliver(pipeline.message(integration), *duplicates) == []
    after = time.time()

    # then the batch took the three places at once, sent one message, and gave two back: the
    # bucket is full again one place's refill (60 / 28 s) after the batch took its places.
    assert len(pipeline.smtp.accepted) == 1
    bucket = pipeline.stack.client("dynamodb").get_item(
        TableName=pipeline.env["MESSAGE_TABLE"], Key={"pk": {"S": f"gov#{integration}#rate"}}
    )["Item"]
    full_again = float(bucket["tat"]["N"])
    assert before + 60 / 28 <= full_again <= after + 60 / 28 + 1e-5


def test_a_batch_paced_by_the_governor_waits_on_its_connection_instead_of_requeueing(
    pipeline: MailPipeline,
) -> None:
    # 60 a minute: a burst of 6, then about one a second — short waits, taken inside the batch.
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 60})
    messages = [pipeline.message(integration) for _ in range(10)]

    assert pipeline.deliver(*messages) == []

    assert len(pipeline.smtp.accepted) == 10
    assert (pipeline.smtp.connections, pipeline.smtp.auth_attempts) == (1, 1)
    assert pipeline.delays() == []


# ----------------------------------------------------------------------- warm SMTP sessions


def connection_leases(pipeline: MailPipeline, integration: str) -> dict[str, float]:
    """The expiry of every lease on the integration's connection slots, by slot."""
    item = (
        pipeline.stack.client("dynamodb")
        .get_item(TableName=pipeline.env["MESSAGE_TABLE"], Key={"pk": {"S": f"gov#{integration}#conn"}})
        .get("Item", {})
    )
    return {slot: float(v["N"]) for slot, v in item.get("holders", {}).get("M", {}).items()}


def lapse_leases(pipeline: MailPipeline, integration: str) -> None:
    """Let every lease on the integration's slots run out (time passing, without the wait)."""
    past = time.time() - 1
    for slot in connection_leases(pipeline, integration):
        pipeline.stack.client("dynamodb").update_item(
            TableName=pipeline.env["MESSAGE_TABLE"],
            Key={"pk": {"S": f"gov#{integration}#conn"}},
            UpdateExpression="SET holders.#slot = :past",
            ExpressionAttributeNames={"#slot": slot},
            ExpressionAttributeValues={":past": {"N": f"{past:.3f}"}},
        )


def age_parked_sessions(seconds: float) -> None:
    """Time passing for this environment's parked sessions, as it does for a frozen environment
    (they were parked ``seconds`` earlier, and their leases run out that much sooner)."""
    for parked in runtime._idle_sessions.values():
        for entry in parked._parked.values():
            entry.parked_at -= seconds
            if entry.slot is not None:
                entry.slot = dataclasses.replace(entry.slot, expires_at=entry.slot.expires_at - seconds)


@contextlib.contextmanager
def another_environment() -> Iterator[None]:
    """Run the handler as a second execution environment would: its own parked sessions (the
    first environment's stay open, frozen, and come back afterwards)."""
    first = dict(runtime._idle_sessions)
    runtime._idle_sessions.clear()
    try:
        yield
    finally:
        for parked in runtime._idle_sessions.values():
            for entry in parked.drop_all():
                entry.session.close()
        runtime._idle_sessions.clear()
        runtime._idle_sessions.update(first)


def test_a_second_batch_in_the_same_environment_reuses_the_idle_session(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600, "max_connections": 3})
    first = [pipeline.message(integration) for _ in range(3)]
    second = [pipeline.message(integration) for _ in range(3)]

    assert pipeline.deliver(*first) == []
    # Between invocations the session stays open, its slot leased as long as the server may
    # keep the connection.
    [(slot, lease)] = connection_leases(pipeline, integration).items()
    assert lease <= time.time() + SERVER_IDLE_SECONDS + IDLE_LEASE_MARGIN_SECONDS + PARK_RENEWAL_SLACK_SECONDS
    requests: list[str] = []
    runtime.aws_client("dynamodb").meta.events.register(
        "before-call.dynamodb", lambda model, **_: requests.append(model.name), unique_id="count"
    )
    assert pipeline.deliver(*second) == []
    # Taking the session back costs nothing, and so does parking it again while the lease the
    # first batch renewed still covers the server's idle timeout: a claim per message, the batch's
    # `sent` records in one request, and the pace (one write).
    assert sorted(requests) == sorted(["UpdateItem"] * 3 + ["BatchWriteItem"] + ["UpdateItem"])

    assert len(pipeline.smtp.accepted) == 6
    assert (pipeline.smtp.connections, pipeline.smtp.auth_attempts) == (1, 1)
    assert all(pipeline.status(m["id"])["status"] == "sent" for m in first + second)
    assert connection_leases(pipeline, integration) == {slot: lease}  # still one slot, as renewed


def test_a_session_parked_past_the_renewal_slack_renews_its_lease(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600, "max_connections": 3})
    assert pipeline.deliver(pipeline.message(integration)) == []
    [first_lease] = connection_leases(pipeline, integration).values()

    age_parked_sessions(PARK_RENEWAL_SLACK_SECONDS)  # the slack spent: the lease no longer covers
    assert pipeline.deliver(pipeline.message(integration)) == []

    [renewed] = connection_leases(pipeline, integration).values()
    assert renewed > first_lease  # renewed from now, as long as the server may keep the connection
    assert renewed >= time.time() + SERVER_IDLE_SECONDS + IDLE_LEASE_MARGIN_SECONDS
    assert (pipeline.smtp.connections, pipeline.smtp.auth_attempts) == (1, 1)


@pytest.mark.parametrize("announce", [True, False], ids=["421-then-close", "reset-without-a-word"])
def test_a_session_the_server_closed_while_idle_is_replaced_without_losing_a_message(
    pipeline: MailPipeline, announce: bool
) -> None:
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600})
    assert pipeline.deliver(pipeline.message(integration)) == []
    assert pipeline.smtp.drop_idle_connections(announce=announce) == 1  # the server's idle timeout

    later = [pipeline.message(integration) for _ in range(3)]
    assert pipeline.deliver(*later) == []

    assert len(pipeline.smtp.accepted) == 4
    assert pipeline.smtp.connections == 2
    assert all(pipeline.status(m["id"])["status"] == "sent" for m in later)
    assert all(pipeline.status(m["id"])["attempts"] == 1 for m in later)
    assert pipeline.delays() == []


def test_a_session_whose_token_expires_while_idle_is_replaced_not_reauthenticated(
    pipeline: MailPipeline,
) -> None:
    # Short-lived tokens: less than the minute a parked session's token must still have left,
    # and the broker refreshes them past half their life.
    pipeline.tokens.lifetime = 6
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600})
    assert pipeline.deliver(pipeline.message(integration)) == []
    time.sleep(3.5)  # the idle session's token is now due for refresh

    assert pipeline.deliver(pipeline.message(integration)) == []

    # A new connection with its own single AUTH: never a second AUTH on the old one.
    assert len(pipeline.smtp.accepted) == 2
    assert (pipeline.smtp.connections, pipeline.smtp.auth_attempts) == (2, 2)
    assert pipeline.tokens.issued(client_id=pipeline.client_id(integration)) == 2
    assert len(connection_leases(pipeline, integration)) == 1  # the old session's slot was released


def test_an_idle_session_keeps_the_mailboxs_only_slot_and_gives_it_up_when_another_environment_asks(
    pipeline: MailPipeline,
) -> None:
    # Given a mailbox allowed one connection, held by an idle session of environment A,
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600, "max_connections": 1})
    assert pipeline.deliver(pipeline.message(integration)) == []
    [lease] = connection_leases(pipeline, integration).values()
    assert lease >= time.time() + 500  # as long as the server may keep the connection open

    # environment B's message waits for the slot (put back, no attempt counted),
    waiting = pipeline.message(integration)
    with another_environment():
        assert len(pipeline.deliver(waiting)) == 1
    assert (pipeline.status(waiting["id"]) or {}).get("attempts", 0) == 0

    # A's next batch, once A's lease needs renewing (a few seconds on), sends it on the idle
    # session, then closes the session and frees the slot,
    pipeline.pass_time()
    age_parked_sessions(PARK_RENEWAL_SLACK_SECONDS)
    assert pipeline.run(pipeline.receive()) == []
    assert pipeline.status(waiting["id"])["status"] == "sent"
    assert pipeline.smtp.connections == 1
    assert connection_leases(pipeline, integration) == {}

    # and B takes it: never two connections at once.
    with another_environment():
        assert pipeline.deliver(pipeline.message(integration)) == []
    assert pipeline.smtp.connections == 2
    assert pipeline.smtp.max_concurrent[SENDER] == 1


def test_a_frozen_environment_whose_lease_lapsed_closes_its_session_and_waits_for_a_slot(
    pipeline: MailPipeline,
) -> None:
    # Given environment A frozen with an idle session on the mailbox's only slot,
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600, "max_connections": 1})
    assert pipeline.deliver(pipeline.message(integration)) == []

    # once the server's idle timeout has closed it and the lease has lapsed (ten minutes on),
    assert pipeline.smtp.drop_idle_connections() == 1
    lapse_leases(pipeline, integration)
    age_parked_sessions(605)
    # B takes the slot (its idle session holds it),
    with another_environment():
        assert pipeline.deliver(pipeline.message(integration)) == []
    # and A, woken, finds its slot gone: it closes its session and waits, without an attempt.
    later = pipeline.message(integration)
    assert len(pipeline.deliver(later)) == 1
    assert (pipeline.status(later["id"]) or {}).get("attempts", 0) == 0

    assert len(pipeline.smtp.accepted) == 2
    assert pipeline.smtp.connections == 2
    assert pipeline.smtp.max_concurrent[SENDER] == 1


def test_with_idle_sessions_off_each_batch_closes_its_session_and_releases_its_slot(
    pipeline: MailPipeline,
) -> None:
    pipeline.setenv("SMTP_IDLE_SECONDS", "0")
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600, "max_connections": 3})

    assert pipeline.deliver(pipeline.message(integration)) == []
    assert connection_leases(pipeline, integration) == {}
    assert pipeline.deliver(pipeline.message(integration)) == []

    assert (pipeline.smtp.connections, pipeline.smtp.auth_attempts) == (2, 2)


def test_bad_json_in_the_middle_of_a_batch_does_not_affect_the_others(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    first, last = pipeline.message(integration), pipeline.message(integration)
    pipeline.post(first)
    broken_sqs_id = pipeline.post('{"integration": "x", "to": ["a@b.example"')
    pipeline.post(last)

    assert pipeline.run(pipeline.receive()) == []

    assert len(pipeline.smtp.accepted) == 2
    assert pipeline.status(first["id"])["status"] == pipeline.status(last["id"])["status"] == "sent"
    broken = pipeline.status(broken_sqs_id)
    assert broken["status"] == "failed" and broken["last_error"]["code"] == "invalid_message"
    [letter] = pipeline.dead_letter_messages()
    assert letter["body"] == '{"integration": "x", "to": ["a@b.example"'
    assert letter["attributes"]["message_id"] == broken_sqs_id
    assert pipeline.queue_depth() == (0, 0)


def test_an_invalid_message_lists_every_problem_in_its_status_and_dead_letter(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration, to=[], headers={"X-Bad": "line\r\nBcc: victim@example.com"})

    assert pipeline.deliver(message) == []

    status = pipeline.status(message["id"])
    assert status["status"] == "failed"
    problems = {p["field"] for p in status["last_error"]["details"]}
    assert {"to", "headers.X-Bad"} <= problems
    [letter] = pipeline.dead_letter_messages()
    assert letter["attributes"]["error_code"] == "invalid_message"
    assert letter["attributes"]["message_id"] == message["id"]
    assert "to" in letter["attributes"]["error_message"]
    assert pipeline.smtp.accepted == []


def test_broken_json_with_a_recognisable_id_is_recorded_under_that_id(pipeline: MailPipeline) -> None:
    pipeline.add("microsoft")
    message_id = f"broken-{pipeline.uid}"

    assert pipeline.deliver('{"id": "' + message_id + '", "integration": ') == []

    assert pipeline.status(message_id)["last_error"]["code"] == "invalid_message"


# ------------------------------------------------------------------------------ permanent failures


def _unknown_integration(p: MailPipeline) -> dict[str, Any]:
    p.add("microsoft")
    return p.message(f"nobody-{p.uid}")


def _sender_not_allowed(p: MailPipeline) -> dict[str, Any]:
    return p.message(p.add("microsoft"), **{"from": {"email": "ceo@contoso.com"}})


def _token_invalid_grant(p: MailPipeline) -> dict[str, Any]:
    integration = p.add("google")
    p.tokens.revoke_refresh_token(p.integrations.get(integration).refresh_token.get_secret_value())
    return p.message(integration)


def _token_invalid_client(p: MailPipeline) -> dict[str, Any]:
    integration = p.add("microsoft")
    p.tokens.register_microsoft_app("contoso", f"client-{integration}", "a-rotated-secret")
    return p.message(integration)


def _smtp_auth_failed(p: MailPipeline) -> dict[str, Any]:
    return p.message(p.add("microsoft", mailbox={"allowed_clients": ["another-app"]}))


def _smtp_auth_disabled(p: MailPipeline) -> dict[str, Any]:
    return p.message(p.add("microsoft", mailbox={"smtp_auth_disabled": True}))


def _send_as_denied(p: MailPipeline) -> dict[str, Any]:
    integration = p.add("microsoft", senders=[{"email": SENDER}, {"email": ALIAS}])
    return p.message(integration, **{"from": {"email": ALIAS}})


def _recipient_rejected(p: MailPipeline) -> dict[str, Any]:
    p.smtp.fail("rcpt", 550, "5.1.1 User unknown", times=2)
    return p.message(p.add("microsoft"))


def _message_too_large(p: MailPipeline) -> dict[str, Any]:
    p.smtp.size_limit = 2000
    return p.message(p.add("microsoft"), text="x" * 3000)


def _smtp_permanent(p: MailPipeline) -> dict[str, Any]:
    p.smtp.fail("eod", 550, "5.7.1 Message rejected as spam")
    return p.message(p.add("microsoft"))


@pytest.mark.parametrize(
    ("code", "arrange"),
    [
        ("unknown_integration", _unknown_integration),
        ("sender_not_allowed", _sender_not_allowed),
        ("token_invalid_grant", _token_invalid_grant),
        ("token_invalid_client", _token_invalid_client),
        ("smtp_auth_failed", _smtp_auth_failed),
        ("smtp_auth_disabled", _smtp_auth_disabled),
        ("send_as_denied", _send_as_denied),
        ("recipient_rejected", _recipient_rejected),
        ("message_too_large", _message_too_large),
        ("smtp_permanent", _smtp_permanent),
    ],
)
def test_a_permanent_failure_is_recorded_and_dead_lettered_with_its_reason(
    pipeline: MailPipeline, code: str, arrange: Any
) -> None:
    message = arrange(pipeline)

    failed = pipeline.deliver(message)

    assert failed == []  # reported done, so SQS deletes it instead of looping to maxReceiveCount
    status = pipeline.status(message["id"])
    assert status["status"] == "failed"
    assert status["last_error"]["code"] == code
    assert status["last_error"]["hint"]
    [letter] = pipeline.dead_letter_messages()
    assert json.loads(letter["body"]) == message
    assert letter["attributes"]["error_code"] == code
    assert letter["attributes"]["message_id"] == message["id"]
    assert letter["attributes"]["integration"] == message["integration"]
    assert letter["attributes"]["error_hint"] == status["last_error"]["hint"]
    assert pipeline.smtp.accepted == []
    assert pipeline.queue_depth() == (0, 0)
    assert pipeline.visibility == []


def test_smtp_auth_failure_is_final_only_after_one_fresh_token(pipeline: MailPipeline) -> None:
    message = _smtp_auth_failed(pipeline)

    pipeline.deliver(message)

    assert pipeline.smtp.auth_attempts == 2
    assert pipeline.tokens.issued(client_id=f"client-{message['integration']}") == 2


def test_connection_lost_after_the_body_is_never_resent(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    pipeline.smtp.fail("disconnect_after_eod")
    message = pipeline.message(integration)
    pipeline.post(message)
    event = pipeline.receive()

    first = pipeline.run(event)
    again = pipeline.run(event)  # the same record, redelivered

    assert first == [] and again == []
    assert len(pipeline.smtp.accepted) == 1  # the server did take it
    status = pipeline.status(message["id"])
    assert (status["status"], status["last_error"]["code"]) == ("failed", "delivery_uncertain")
    letters = pipeline.dead_letter_messages()
    assert {letter["attributes"]["error_code"] for letter in letters} == {"delivery_uncertain"}


# ------------------------------------------------------------------------------ retryable failures


def _throttled(p: MailPipeline) -> dict[str, Any]:
    p.smtp.fail("eod", 432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")
    return p.message(p.add("microsoft"))


def _smtp_transient(p: MailPipeline) -> dict[str, Any]:
    p.smtp.fail("mail", 451, "4.3.0 Temporary server error. Please try again later")
    return p.message(p.add("microsoft"))


def _token_unavailable(p: MailPipeline) -> dict[str, Any]:
    integration = p.add("oauth2")
    p.tokens.fail_next("500", times=10)
    return p.message(integration)


@pytest.mark.parametrize(
    ("code", "arrange"),
    [
        ("throttled", _throttled),
        ("smtp_transient", _smtp_transient),
        ("token_unavailable", _token_unavailable),
    ],
)
def test_a_retryable_failure_goes_back_on_the_queue_after_the_first_retry_delay(
    pipeline: MailPipeline, code: str, arrange: Any
) -> None:
    message = arrange(pipeline)
    before = time.time()

    failed = pipeline.deliver(message)

    assert len(failed) == 1
    [delay] = pipeline.delays()
    assert ONE_MINUTE[0] <= delay <= ONE_MINUTE[1]
    status = pipeline.status(message["id"])
    assert (status["status"], status["attempts"], status["last_error"]["code"]) == ("retrying", 1, code)
    next_attempt = dt.datetime.fromisoformat(status["next_attempt_at"]).timestamp()
    assert before + delay - 2 <= next_attempt <= time.time() + delay + 1
    assert pipeline.queue_depth() == (0, 1)  # on the send queue, invisible until then
    assert pipeline.dead_letter_messages() == []
    assert pipeline.smtp.accepted == []


def test_a_providers_retry_after_longer_than_the_schedule_is_honoured(pipeline: MailPipeline) -> None:
    integration = pipeline.add("oauth2")
    pipeline.tokens.fail_next("429", retry_after=300)
    message = pipeline.message(integration)

    assert len(pipeline.deliver(message)) == 1

    [delay] = pipeline.delays()
    assert 299 <= delay <= 301
    assert pipeline.status(message["id"])["last_error"]["code"] == "token_unavailable"


def test_aws_unavailable_is_retried_on_the_receive_count_when_no_status_can_be_kept(
    pipeline: MailPipeline,
) -> None:
    integration = pipeline.add("microsoft")
    pipeline.setenv("MESSAGE_TABLE", f"missing-{pipeline.uid}")
    message = pipeline.message(integration)

    failed = pipeline.deliver(message)

    assert len(failed) == 1
    [delay] = pipeline.delays()
    assert ONE_MINUTE[0] <= delay <= ONE_MINUTE[1]
    assert pipeline.queue_depth() == (0, 1)
    assert pipeline.smtp.accepted == []
    assert pipeline.dead_letter_messages() == []


def test_retry_delays_grow_with_each_attempt_until_the_message_is_sent(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    pipeline.smtp.fail("mail", 451, "4.3.0 Try again later", times=2)
    message = pipeline.message(integration)
    pipeline.post(message)

    outcomes = []
    for _ in range(3):
        event = pipeline.receive()
        outcomes.append(pipeline.run(event))
        if outcomes[-1]:
            pipeline.make_visible(event)  # the delay passes

    assert [len(o) for o in outcomes] == [1, 1, 0]
    first, second = pipeline.delays()[:2]
    assert ONE_MINUTE[0] <= first <= ONE_MINUTE[1] and 270 <= second <= 330
    status = pipeline.status(message["id"])
    assert (status["status"], status["attempts"]) == ("sent", 3)
    assert "last_error" not in status
    assert len(pipeline.smtp.accepted) == 1


def test_a_message_older_than_the_maximum_age_fails_as_expired_with_its_last_error(
    pipeline: MailPipeline,
) -> None:
    integration = pipeline.add("microsoft")
    pipeline.setenv("MAX_MESSAGE_AGE_HOURS", "0.0001")  # 0.36 s
    pipeline.smtp.fail("mail", 451, "4.3.0 Try again later")
    message = pipeline.message(integration)
    pipeline.post(message)
    time.sleep(0.5)

    assert pipeline.run(pipeline.receive()) == []

    status = pipeline.status(message["id"])
    assert (status["status"], status["last_error"]["code"]) == ("failed", "expired")
    assert status["last_error"]["last_error"]["code"] == "smtp_transient"
    [letter] = pipeline.dead_letter_messages()
    assert letter["attributes"]["error_code"] == "expired"
    assert "smtp_transient" in letter["attributes"]["error_message"]
    assert pipeline.queue_depth() == (0, 0)


def test_a_retryable_failure_on_the_last_receive_sqs_allows_is_dead_lettered_with_its_error(
    pipeline: MailPipeline,
) -> None:
    integration = pipeline.add("microsoft")
    message = pipeline.message(integration)
    pipeline.post(message)
    policy = pipeline.sqs.get_queue_attributes(QueueUrl=pipeline.queue_url, AttributeNames=["RedrivePolicy"])
    limit = json.loads(policy["Attributes"]["RedrivePolicy"])["maxReceiveCount"]  # the template's
    for _ in range(limit - 1):  # earlier receives whose outcome never reached the queue
        pipeline.make_visible(pipeline.receive())
    pipeline.smtp.fail("mail", 451, "4.3.0 Try again later")
    event = pipeline.receive()
    assert event["Records"][0]["attributes"]["ApproximateReceiveCount"] == str(limit)

    assert pipeline.run(event) == []

    status = pipeline.status(message["id"])
    assert (status["status"], status["last_error"]["code"]) == ("failed", "expired")
    assert "maxReceiveCount" in status["last_error"]["message"]
    assert status["last_error"]["last_error"]["code"] == "smtp_transient"
    [letter] = pipeline.dead_letter_messages()
    assert letter["attributes"]["error_code"] == "expired"


def test_a_message_put_back_again_and_again_waits_longer_each_time(pipeline: MailPipeline) -> None:
    # Given a mailbox allowed one connection, held by an idle session of environment A,
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600, "max_connections": 1})
    assert pipeline.deliver(pipeline.message(integration)) == []
    waiting = pipeline.message(integration)
    pipeline.post(waiting)

    # environment B puts the message back on each receive, later each time,
    delays = []
    with another_environment():
        for _ in range(24):
            event = pipeline.receive()
            assert len(pipeline.run(event)) == 1
            delays.append(pipeline.delays()[-1])
            pipeline.make_visible(event)

    assert delays[0] <= 5 and delays == sorted(delays) and delays[-1] >= 6
    assert (pipeline.status(waiting["id"]) or {}).get("attempts", 0) == 0
    # so the queue's receives outlast a parked session's hold on the slot.
    policy = pipeline.sqs.get_queue_attributes(QueueUrl=pipeline.queue_url, AttributeNames=["RedrivePolicy"])
    limit = json.loads(policy["Attributes"]["RedrivePolicy"])["maxReceiveCount"]
    budget = sum(put_back_delay(delays[0], n) for n in range(1, limit))
    assert budget > SERVER_IDLE_SECONDS + IDLE_LEASE_MARGIN_SECONDS


def test_a_message_still_waiting_for_a_connection_on_its_last_receive_fails_with_a_status_record(
    pipeline: MailPipeline,
) -> None:
    # Given a mailbox allowed one connection, held by an idle session of environment A,
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 600, "max_connections": 1})
    assert pipeline.deliver(pipeline.message(integration)) == []
    # a message for it that environment B has received as often as the queue allows,
    waiting = pipeline.message(integration)
    pipeline.post(waiting)
    policy = pipeline.sqs.get_queue_attributes(QueueUrl=pipeline.queue_url, AttributeNames=["RedrivePolicy"])
    limit = json.loads(policy["Attributes"]["RedrivePolicy"])["maxReceiveCount"]
    for _ in range(limit - 1):  # put back while the slot was taken
        pipeline.make_visible(pipeline.receive())
    event = pipeline.receive()
    assert event["Records"][0]["attributes"]["ApproximateReceiveCount"] == str(limit)

    # is failed by B on that receive, never dropped by SQS without a record:
    with another_environment():
        assert pipeline.run(event) == []

    status = pipeline.status(waiting["id"])
    assert (status["status"], status["last_error"]["code"]) == ("failed", "expired")
    assert status["last_error"]["last_error"]["code"] == "throttled"
    [letter] = pipeline.dead_letter_messages()
    attributes = letter["attributes"]
    assert (attributes["error_code"], attributes["message_id"]) == ("expired", waiting["id"])
    assert pipeline.queue_depth() == (0, 0)


def test_a_throttled_reply_holds_back_the_rest_of_the_batch_without_counting_attempts(
    pipeline: MailPipeline,
) -> None:
    integration = pipeline.add("microsoft")
    pipeline.smtp.fail("eod", 432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")
    messages = [pipeline.message(integration) for _ in range(3)]

    failed = pipeline.deliver(*messages)

    assert len(failed) == 3
    statuses = [pipeline.status(m["id"]) for m in messages]
    # The throttled one counts an attempt; the two held back were never tried and have no record.
    assert sorted(str(s and (s["status"], s["attempts"])) for s in statuses) == [
        "('retrying', 1)",
        "None",
        "None",
    ]
    assert len(pipeline.smtp.accepted) == 0
    assert pipeline.smtp.auth_attempts == 1
    assert all(d >= 54 for d in pipeline.delays())


def test_over_the_governor_rate_a_message_waits_without_counting_an_attempt(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft", limits={"messages_per_minute": 1})
    first, second = pipeline.message(integration), pipeline.message(integration)

    failed = pipeline.deliver(first, second)

    assert len(failed) == 1 and len(pipeline.smtp.accepted) == 1
    waiting = second if pipeline.status(first["id"])["status"] == "sent" else first
    assert pipeline.status(waiting["id"]) is None  # not attempted, nothing to report
    [delay] = pipeline.delays()
    assert 50 <= delay <= 61


def test_a_failed_visibility_change_still_fails_the_record(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    pipeline.smtp.fail("mail", 451, "4.3.0 Try again later")
    message = pipeline.message(integration)
    pipeline.post(message)
    event = pipeline.receive()
    event["Records"][0]["receiptHandle"] = "a-receipt-handle-sqs-no-longer-honours"

    failed = pipeline.run(event)

    assert failed == [event["Records"][0]["messageId"]]
    assert pipeline.status(message["id"])["status"] == "retrying"
    assert pipeline.queue_depth() == (0, 1)  # the queue's own visibility timeout applies


def test_a_message_the_dead_letter_queue_cannot_take_stays_on_the_send_queue(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    pipeline.setenv("DEAD_LETTER_QUEUE_URL", pipeline.dlq_url + "-missing")
    message = pipeline.message(integration, **{"from": {"email": "ceo@contoso.com"}})

    failed = pipeline.deliver(message)

    assert len(failed) == 1
    assert pipeline.status(message["id"])["last_error"]["code"] == "sender_not_allowed"
    assert pipeline.queue_depth() == (0, 1)


# ----------------------------------------------------------------------------------------- re-drive


def redrive(p: MailPipeline) -> None:
    """What ``aws sqs start-message-move-task`` does: each dead letter back on the send queue,
    attributes included (moto does not implement move tasks)."""
    for letter in p.dead_letter_messages():
        raw = letter["raw"]
        p.sqs.send_message(
            QueueUrl=p.queue_url, MessageBody=raw["Body"], MessageAttributes=raw.get("MessageAttributes", {})
        )
        p.sqs.delete_message(QueueUrl=p.dlq_url, ReceiptHandle=raw["ReceiptHandle"])


def test_a_redriven_message_is_sent_once_the_cause_is_fixed(pipeline: MailPipeline) -> None:
    pipeline.setenv("SECRET_MAX_AGE_SECONDS", "0")  # see the fixed integration at once, not in a minute
    integration = pipeline.add("microsoft", mailbox={"send_as": [ALIAS]})
    message = pipeline.message(integration, **{"from": {"email": ALIAS}})
    pipeline.deliver(message)
    assert pipeline.status(message["id"])["last_error"]["code"] == "sender_not_allowed"

    # The operator adds the sender to the integration.
    pipeline.add("microsoft", senders=[{"email": SENDER}, {"email": ALIAS}], mailbox={"send_as": [ALIAS]})
    redrive(pipeline)
    failed = pipeline.run(pipeline.receive())

    assert failed == []
    assert pipeline.status(message["id"])["status"] == "sent"
    assert len(pipeline.smtp.accepted) == 1


def test_an_uncertain_delivery_is_resent_only_when_an_operator_redrives_it(pipeline: MailPipeline) -> None:
    integration = pipeline.add("microsoft")
    pipeline.smtp.fail("disconnect_after_eod")
    message = pipeline.message(integration)
    pipeline.deliver(message)

    redrive(pipeline)
    failed = pipeline.run(pipeline.receive())

    assert failed == []
    assert len(pipeline.smtp.accepted) == 2
    assert pipeline.status(message["id"])["status"] == "sent"


# ------------------------------------------------------------------------------- secrets, metrics


def test_no_credential_appears_in_logs_status_records_or_dead_letters(
    pipeline: MailPipeline, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    microsoft = pipeline.add("microsoft")
    basic = pipeline.add("basic")
    pipeline.smtp.fail("eod", 550, "5.7.1 Rejected")
    messages = [
        pipeline.message(microsoft),
        pipeline.message(basic),
        pipeline.message(microsoft, to=[]),
        pipeline.message(basic),
    ]
    pipeline.deliver(*messages)
    refused = _smtp_auth_failed(pipeline)  # a token refused twice
    pipeline.deliver(refused)
    tokens = [runtime.token_broker().token_for(microsoft).access_token]

    captured = capsys.readouterr()
    items = pipeline.stack.client("dynamodb").scan(TableName=pipeline.env["MESSAGE_TABLE"])["Items"]
    everything = "\n".join(
        [
            captured.out,
            captured.err,
            caplog.text,
            json.dumps(items),
            json.dumps([letter["raw"] for letter in pipeline.dead_letter_messages()]),
        ]
    )
    assert "MessagesSent" in captured.out and "MessagesFailed" in captured.out
    for secret in [CLIENT_SECRET, PASSWORD, base64.b64encode(PASSWORD.encode()).decode(), *tokens]:
        assert secret not in everything


def test_metrics_are_emitted_per_integration(
    pipeline: MailPipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    integration = pipeline.add("microsoft")
    pipeline.smtp.fail("rcpt", 550, "5.1.1 User unknown", times=2)
    pipeline.deliver(pipeline.message(integration), pipeline.message(integration))

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        for metric in line["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            by_name.setdefault(metric["Name"], []).append(line)

    assert by_name["MessagesSent"][0]["integration"] == integration
    assert by_name["MessagesFailed"][0]["code"] == "recipient_rejected"
    assert by_name["TokenSource"][0]["source"] == "provider"
    assert len(by_name["SmtpDurationMs"]) == 2
    assert all(line["integration"] == integration for metric in by_name.values() for line in metric)
