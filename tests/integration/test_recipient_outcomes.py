"""Each recipient's own outcome, counted at the SMTP server: a recipient refused for now is
retried alone until delivered or expired; whoever has the message never gets it twice; the
status record (and so ``GET /v1/messages/{id}``) shows every recipient's state, and the status
ends only when every recipient has an outcome."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from tests.fixtures.pipeline import MailPipeline

TO = ["ana@example.com", "bo@example.com", "cy@example.com"]


def deliveries_per_recipient(pipeline: MailPipeline) -> Counter[str]:
    """How many times the server accepted the message for each recipient."""
    accepted = [message for server in pipeline.servers for message in server.accepted]
    return Counter(rcpt for message in accepted for rcpt in message.rcpt_tos)


def states(status: dict[str, Any]) -> dict[str, str]:
    return {entry["recipient"]: entry["status"] for entry in status["recipients"]}


def test_a_recipient_refused_for_now_is_retried_alone_and_delivered_exactly_once(
    mail_pipeline: MailPipeline,
) -> None:
    # Given a message to three recipients, the third refused once with 452 4.5.3
    integration = mail_pipeline.add("microsoft")
    mail_pipeline.smtp.fail("rcpt", 452, "4.5.3 Too many recipients", recipient="cy@example.com")
    message = mail_pipeline.message(integration, to=TO)
    mail_pipeline.post(message)

    # When the first attempt runs
    mail_pipeline.round()

    # Then the two accepted recipients have it, the third waits on the retry schedule
    status = mail_pipeline.status(message["id"])
    assert status["status"] == "retrying"
    assert states(status) == {
        "ana@example.com": "delivered",
        "bo@example.com": "delivered",
        "cy@example.com": "retrying",
    }
    [pending] = [e for e in status["recipients"] if e["status"] == "retrying"]
    assert pending["code"] == "throttled" and pending["reply"] == "452 4.5.3 Too many recipients"
    assert "retried on their own" in pending["hint"]
    assert status["last_error"]["code"] == "throttled"
    assert 54 <= mail_pipeline.delays()[-1] <= 66  # the usual first retry
    assert deliveries_per_recipient(mail_pipeline) == Counter({"ana@example.com": 1, "bo@example.com": 1})

    # When the retry delay has passed and the next attempt runs
    mail_pipeline.drive()

    # Then the third recipient gets it alone, and nobody twice
    assert deliveries_per_recipient(mail_pipeline) == Counter(dict.fromkeys(TO, 1))
    assert [accepted.rcpt_tos for accepted in mail_pipeline.smtp.accepted] == [TO[:2], TO[2:]]
    status = mail_pipeline.status(message["id"])
    assert status["status"] == "sent"
    assert states(status) == dict.fromkeys(TO, "delivered")
    assert "refused" not in status
    assert mail_pipeline.dead_letters() == {}
    assert mail_pipeline.queue_depth() == (0, 0)


def test_a_retried_recipient_refused_for_good_on_retry_fails_alone_and_the_message_is_sent(
    mail_pipeline: MailPipeline,
) -> None:
    integration = mail_pipeline.add("microsoft")
    mail_pipeline.smtp.fail("rcpt", 450, "4.2.1 Try again later", recipient="cy@example.com")
    mail_pipeline.smtp.fail("rcpt", 550, "5.1.1 User unknown", recipient="cy@example.com")
    message = mail_pipeline.message(integration, to=TO)
    mail_pipeline.post(message)

    mail_pipeline.drive()

    status = mail_pipeline.status(message["id"])
    assert status["status"] == "sent"
    assert states(status) == {
        "ana@example.com": "delivered",
        "bo@example.com": "delivered",
        "cy@example.com": "failed",
    }
    assert status["refused"] == [{"recipient": "cy@example.com", "reply": "550 5.1.1 User unknown"}]
    assert deliveries_per_recipient(mail_pipeline) == Counter({"ana@example.com": 1, "bo@example.com": 1})
    # The second attempt carried only the one recipient; nothing was sent in it.
    assert len(mail_pipeline.smtp.accepted) == 1


def test_a_recipient_still_refused_at_the_maximum_age_fails_as_expired_and_the_others_keep_it(
    mail_pipeline: MailPipeline,
) -> None:
    integration = mail_pipeline.add("microsoft")
    mail_pipeline.smtp.fail("rcpt", 452, "4.5.3 Too many recipients", recipient="cy@example.com", times=5)
    message = mail_pipeline.message(integration, to=TO)
    mail_pipeline.post(message)
    mail_pipeline.round()
    mail_pipeline.setenv("MAX_MESSAGE_AGE_HOURS", "0.0001")  # 0.36 s
    time.sleep(0.5)

    mail_pipeline.drive()

    outcome = mail_pipeline.outcome(message["id"])
    assert outcome.state == "failed" and outcome.code == "expired"
    assert states(outcome.status) == {
        "ana@example.com": "delivered",
        "bo@example.com": "delivered",
        "cy@example.com": "failed",
    }
    [expired] = [e for e in outcome.status["recipients"] if e["status"] == "failed"]
    assert expired["code"] == "expired"
    assert deliveries_per_recipient(mail_pipeline) == Counter({"ana@example.com": 1, "bo@example.com": 1})


def test_a_redriven_partly_delivered_message_goes_only_to_who_does_not_have_it(
    mail_pipeline: MailPipeline,
) -> None:
    integration = mail_pipeline.add("microsoft")
    mail_pipeline.smtp.fail("rcpt", 452, "4.5.3 Too many recipients", recipient="cy@example.com", times=5)
    message = mail_pipeline.message(integration, to=TO)
    mail_pipeline.post(message)
    mail_pipeline.round()
    mail_pipeline.setenv("MAX_MESSAGE_AGE_HOURS", "0.0001")
    time.sleep(0.5)
    mail_pipeline.drive()
    assert mail_pipeline.outcome(message["id"]).code == "expired"

    # The operator fixes the cause and re-drives the dead letter
    mail_pipeline.smtp.clear_faults()
    mail_pipeline.setenv("MAX_MESSAGE_AGE_HOURS", "24")
    mail_pipeline.redrive(message["id"])
    mail_pipeline.drive()

    assert deliveries_per_recipient(mail_pipeline) == Counter(dict.fromkeys(TO, 1))
    status = mail_pipeline.status(message["id"])
    assert status["status"] == "sent" and states(status) == dict.fromkeys(TO, "delivered")


def test_every_recipient_refused_at_once_keeps_its_own_outcome(mail_pipeline: MailPipeline) -> None:
    integration = mail_pipeline.add("microsoft")
    mail_pipeline.smtp.fail("rcpt", 550, "5.1.1 User unknown", recipient="ana@example.com")
    mail_pipeline.smtp.fail("rcpt", 450, "4.2.1 Receiving mail too quickly", recipient="bo@example.com")
    message = mail_pipeline.message(integration)
    mail_pipeline.post(message)

    mail_pipeline.round()

    status = mail_pipeline.status(message["id"])
    assert status["status"] == "retrying"
    assert states(status) == {"ana@example.com": "failed", "bo@example.com": "retrying"}
    mail_pipeline.drive()
    status = mail_pipeline.status(message["id"])
    assert status["status"] == "sent"
    assert states(status) == {"ana@example.com": "failed", "bo@example.com": "delivered"}
    assert deliveries_per_recipient(mail_pipeline) == Counter({"bo@example.com": 1})
