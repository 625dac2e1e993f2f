"""The SMTP classification table (errors.py): every reply a provider gives, and every way a
connection can fail, maps to one stable code with the right retry decision."""

from __future__ import annotations

import socket
import ssl

import pytest
from mailbroker.errors import CATALOGUE, SmtpReply, classify_smtp_reply, smtp_connection_failure

# (basic code, reply text, stage, expected code)
PROVIDER_REPLIES = [
    (535, "5.7.3 Authentication unsuccessful", "auth", "smtp_auth_failed"),
    (
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        "auth",
        "smtp_auth_disabled",
    ),
    (535, "5.7.8 Username and Password not accepted.", "auth", "smtp_auth_failed"),
    (534, "5.7.9 Application-specific password required.", "auth", "basic_auth_disabled"),
    (
        554,
        "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
        "body",
        "send_as_denied",
    ),
    (432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", "mail", "throttled"),
    (421, "4.3.2 Service not available, closing transmission channel", "greeting", "throttled"),
    (421, "Too many concurrent connections", "mail", "throttled"),
    (451, "4.7.500 Server busy. Please try again later.", "mail", "throttled"),
    (451, "4.7.650 The mail server has been temporarily rate limited", "rcpt", "throttled"),
    (454, "4.7.0 Too many login attempts, please try again later.", "auth", "throttled"),
    (450, "4.2.1 The user you are trying to contact is receiving mail too quickly", "rcpt", "throttled"),
    (452, "4.5.3 Too many recipients", "rcpt", "throttled"),
    (550, "5.1.1 User unknown", "rcpt", "recipient_rejected"),
    (553, "5.1.3 Invalid address", "rcpt", "recipient_rejected"),
    (551, "5.1.6 Recipient has moved", "rcpt", "recipient_rejected"),
    (552, "5.3.4 Message size exceeds fixed maximum message size", "body", "message_too_large"),
    (554, "5.3.4 Message too big for system", "body", "message_too_large"),
    (451, "4.3.0 Temporary server error. Please try again later", "mail", "smtp_transient"),
    (450, "4.7.1 Client host rejected", "mail", "smtp_transient"),
    (452, "4.3.1 Insufficient system storage", "mail", "smtp_transient"),
    (550, "5.7.1 Message rejected as spam", "body", "smtp_permanent"),
    (553, "5.7.1 Sender address rejected", "mail", "smtp_permanent"),
    (501, "5.5.4 Syntax error", "mail", "smtp_permanent"),
    (554, "5.7.1 Relay access denied", "body", "smtp_permanent"),
]


@pytest.mark.parametrize(("basic", "text", "stage", "expected"), PROVIDER_REPLIES)
def test_provider_reply_is_classified_by_its_codes(basic: int, text: str, stage: str, expected: str) -> None:
    # Given a reply a provider sends at a stage of the dialogue
    reply = SmtpReply.parse(basic, text.encode())

    # When it is classified
    failure = classify_smtp_reply(reply, stage)

    # Then it has the expected code, the catalogue's retry decision, the stage and the reply
    assert failure.code == expected
    assert failure.retryable is CATALOGUE[expected].retryable
    assert failure.stage == stage
    assert failure.reply == reply
    assert failure.to_dict()["reply"] == f"{basic} {text}"


def test_throttling_is_retryable_and_rejection_is_not() -> None:
    # Given the two outcomes an operator most needs told apart
    throttled = classify_smtp_reply(
        SmtpReply.parse(432, b"4.3.2 Concurrent connections limit exceeded"), "mail"
    )
    rejected = classify_smtp_reply(SmtpReply.parse(550, b"5.1.1 User unknown"), "rcpt")

    # Then one is retried with back-off and the other never
    assert (throttled.code, throttled.retryable) == ("throttled", True)
    assert (rejected.code, rejected.retryable) == ("recipient_rejected", False)


def test_550_outside_rcpt_is_not_a_recipient_rejection() -> None:
    # Given a 550 after the body (a content rejection, not a bad address)
    failure = classify_smtp_reply(
        SmtpReply.parse(550, b"5.7.350 Remote server returned message detected as spam"), "body"
    )

    # Then it is a permanent message failure
    assert failure.code == "smtp_permanent"


def test_reply_without_enhanced_code_falls_back_on_its_class() -> None:
    # Given replies from a server without ENHANCEDSTATUSCODES
    temporary = classify_smtp_reply(SmtpReply.parse(451, b"Requested action aborted"), "data")
    permanent = classify_smtp_reply(SmtpReply.parse(554, b"Transaction failed"), "body")

    # Then the first digit decides
    assert (temporary.code, permanent.code) == ("smtp_transient", "smtp_permanent")


def test_enhanced_status_code_is_parsed_from_the_reply_text() -> None:
    # Given a multi-line reply as smtplib joins it
    reply = SmtpReply.parse(
        535, b"5.7.8 Username and Password not accepted.\n5.7.8 https://support.google.com"
    )

    # Then the enhanced code is the first line's
    assert reply.enhanced == "5.7.8"
    assert SmtpReply.parse(250, b"OK").enhanced is None


def test_token_shaped_text_in_a_reply_is_redacted_from_the_message() -> None:
    # Given a server that echoes something token-shaped in its refusal
    token = "ya29.a0AfB_byC1234567890abcdefghijklmnopqrstuvwxyz"
    failure = classify_smtp_reply(SmtpReply.parse(535, f"5.7.3 bad token {token}".encode()), "auth")

    # Then the failure's message does not carry it
    assert token not in failure.message
    assert "[redacted]" in failure.message


def test_connection_lost_after_the_body_is_delivery_uncertain_and_not_retried() -> None:
    failure = smtp_connection_failure("body", ConnectionResetError(104, "reset"), after_body=True)

    assert failure.code == "delivery_uncertain"
    assert failure.retryable is False


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
        socket.gaierror(-2, "unknown"),
    ],
)
def test_connection_failure_before_the_body_is_transient(exc: Exception) -> None:
    failure = smtp_connection_failure("mail", exc)

    assert failure.code == "smtp_transient"
    assert failure.retryable is True


def test_untrusted_certificate_is_a_tls_failure() -> None:
    # Given the error the ssl module raises for an untrusted certificate
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "self-signed certificate"

    # Then it is tls_failed, not retried, and says why
    failure = smtp_connection_failure("starttls", exc)
    assert (failure.code, failure.retryable) == ("tls_failed", False)
    assert "self-signed certificate" in failure.message


def test_every_smtp_code_of_the_design_exists_in_the_catalogue() -> None:
    design_codes = {
        "smtp_auth_failed",
        "smtp_auth_disabled",
        "send_as_denied",
        "throttled",
        "recipient_rejected",
        "smtp_transient",
        "smtp_permanent",
        "delivery_uncertain",
        "tls_failed",
        "message_too_large",
    }
    assert design_codes <= set(CATALOGUE)
    assert all(CATALOGUE[code].hint for code in design_codes)
