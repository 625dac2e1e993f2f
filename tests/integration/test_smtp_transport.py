"""The SMTP transport against the sandbox SMTP server on loopback: TLS, XOAUTH2 with real token
verification, pipelining, chunking, the providers' refusals and injected faults."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult
from mailbroker.errors import AddressNotAllowed, SmtpFailure
from mailbroker.integrations import SmtpEndpoint
from mailbroker.messages import build_mime, envelope, parse_message
from mailbroker.smtp import BasicAuth, SmtpSession, XOAuth2Auth, run_check
from mailbroker.smtp.transport import connect_vetted
from pydantic import SecretStr

from mailbroker_sandbox.ca import SandboxCA
from mailbroker_sandbox.smtp_server import SandboxSmtpServer

USER = "support@contoso.com"
NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


class Tokens:
    """The bearer tokens the sandbox server accepts (its ``verify_token`` hook): RFC 7662 claims of
    a Google-style token for the mailbox."""

    def __init__(self) -> None:
        self.claims: dict[str, dict[str, Any]] = {}

    def grant(self, user: str = USER) -> str:
        token = f"ya29.{secrets.token_urlsafe(32)}"
        self.claims[token] = {
            "active": True,
            "sub": user,
            "provider": "google",
            "scope": "https://mail.google.com/",
            "exp": time.time() + 3600,
        }
        return token

    def __call__(self, token: str) -> dict[str, Any] | None:
        return self.claims.get(token)


class TokenSource:
    """A token provider as the broker gives one: ``first`` normally, ``fresh`` when forced."""

    def __init__(self, first: str, fresh: str | None = None) -> None:
        self.first = first
        self.fresh = fresh or first
        self.calls: list[bool] = []

    def __call__(self, force_refresh: bool) -> str:
        self.calls.append(force_refresh)
        return self.fresh if force_refresh else self.first


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def start(smtp_server: Callable[..., SandboxSmtpServer], tokens: Tokens) -> Callable[..., SandboxSmtpServer]:
    def start(**kwargs: Any) -> SandboxSmtpServer:
        server = smtp_server(verify_token=tokens, **kwargs)
        server.add_mailbox(USER)
        return server

    return start


def endpoint(
    server: SandboxSmtpServer, *, security: str | None = None, host: str = "localhost"
) -> SmtpEndpoint:
    return SmtpEndpoint(host=host, port=server.port, security=security or server.mode, timeout_seconds=5)


def session(
    server: SandboxSmtpServer,
    ca: SandboxCA,
    auth: Any,
    *,
    username: str = USER,
    security: str | None = None,
    host: str = "localhost",
) -> SmtpSession:
    return SmtpSession(
        endpoint(server, security=security, host=host),
        username=username,
        auth=auth,
        ssl_context=ca.client_context(),
    )


def mime(**changes: Any) -> tuple[str, list[str], bytes, bool]:
    data: dict[str, Any] = {
        "integration": "support",
        "id": f"order-{secrets.token_hex(4)}",
        "from": {"email": USER, "name": "Support Team"},
        "to": ["ana@example.com", {"email": "bo@example.com", "name": "Bo"}],
        "subject": "Your order shipped",
        "text": "Your order is on its way.",
        "html": "<p>Your order is on its way.</p>",
    }
    data.update(changes)
    message = parse_message(data)
    mail_from, rcpts = envelope(message)
    raw = build_mime(message, message_id_domain="contoso.com", now=NOW).as_bytes()
    return mail_from, rcpts, raw, message.needs_smtputf8


def send(smtp: SmtpSession, **changes: Any) -> Any:
    mail_from, rcpts, raw, utf8 = mime(**changes)
    return smtp.send(mail_from, rcpts, raw, smtputf8=utf8)


def failure_of(action: Callable[[], Any]) -> SmtpFailure:
    with pytest.raises(SmtpFailure) as caught:
        action()
    return caught.value


# --- delivery --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_message_goes_out_with_xoauth2_byte_for_byte(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA, mode: str
) -> None:
    # Given a server that verifies tokens, over STARTTLS or implicit TLS
    server = start(mode=mode)
    mail_from, rcpts, raw, _ = mime(attachments=[{"filename": "a.txt", "content": "aGVsbG8K"}])

    # When a message is sent with a token it accepts
    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        result = smtp.send(mail_from, rcpts, raw)

    # Then the server holds exactly the bytes build_mime made, for every recipient
    (received,) = server.accepted
    assert received.data == raw
    assert received.rcpt_tos == rcpts
    assert received.mail_from == USER
    assert (received.auth_user, received.mechanism) == (USER, "XOAUTH2")
    assert result.reply.code == 250
    assert result.reply.text.startswith(f"2.0.0 OK <{received.queue_id}>")
    assert result.accepted == rcpts
    assert result.refused == {}


def test_default_context_trusts_a_private_ca_through_ssl_cert_file(
    start: Any, tokens: Tokens, ca_trust_env: dict[str, str]
) -> None:
    # Given the sandbox CA trusted the standard way (SSL_CERT_FILE), and no context passed
    server = start()
    smtp = SmtpSession(endpoint(server), username=USER, auth=XOAuth2Auth(TokenSource(tokens.grant())))

    # When a message is sent
    with smtp:
        send(smtp)

    # Then the certificate was verified and the message delivered
    assert len(server.accepted) == 1


def test_pipelined_transaction_delivers_to_accepted_and_reports_refused(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    # Given a pipelining server that refuses one of three recipients
    server = start(pipelining=True, chunking=False)  # the DATA path
    server.fail("rcpt", 550, "5.1.1 User unknown", recipient="bo@example.com")

    # When the message is sent
    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        result = send(smtp, to=["ana@example.com", "bo@example.com", "cy@example.com"])

    # Then it went to the other two in two round trips (envelope + DATA, then the body)
    assert result.accepted == ["ana@example.com", "cy@example.com"]
    assert list(result.refused) == ["bo@example.com"]
    assert (result.refused["bo@example.com"].code, result.refused["bo@example.com"].enhanced) == (
        550,
        "5.1.1",
    )
    assert server.accepted[0].rcpt_tos == ["ana@example.com", "cy@example.com"]
    assert result.round_trips == 2


@pytest.mark.parametrize("pipelining", [True, False])
def test_every_recipient_refused_is_recipient_rejected_and_the_session_goes_on(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA, pipelining: bool
) -> None:
    # Given a server that refuses both recipients of the first message
    server = start(pipelining=pipelining)
    server.fail("rcpt", 550, "5.1.1 User unknown", times=2)

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        # When the message is sent
        failure = failure_of(lambda: send(smtp))

        # Then it fails as a recipient rejection listing each refusal, and nothing was delivered
        assert (failure.code, failure.stage, failure.retryable) == ("recipient_rejected", "rcpt", False)
        assert [d["recipient"] for d in failure.details] == ["ana@example.com", "bo@example.com"]
        assert server.accepted == []

        # And the next message on the same connection goes out (after RSET)
        send(smtp)
    assert len(server.accepted) == 1
    assert server.connections == 1


def test_every_recipient_refused_with_a_temporary_refusal_is_retryable(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    server = start()
    server.fail("rcpt", 550, "5.1.1 User unknown", recipient="ana@example.com")
    server.fail("rcpt", 450, "4.2.1 Receiving mail too quickly", recipient="bo@example.com")

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        failure = failure_of(lambda: send(smtp))

    assert (failure.code, failure.retryable) == ("throttled", True)


def test_server_without_pipelining_gets_one_command_at_a_time(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    # Given a server that does not offer PIPELINING
    server = start(pipelining=False, chunking=False)

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        # When two messages to two recipients are sent
        first = send(smtp)
        second = send(smtp)

    # Then each command waited for its reply: MAIL, 2 RCPT, DATA, body (and RSET before the second)
    assert (first.round_trips, second.round_trips) == (5, 6)
    assert len(server.accepted) == 2


def test_pipelining_keeps_a_reused_connection_at_two_round_trips(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    server = start(pipelining=True, chunking=False)

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        results = [send(smtp) for _ in range(3)]

    assert [r.round_trips for r in results] == [2, 2, 2]


@pytest.mark.parametrize(("pipelining", "round_trips"), [(True, 1), (False, 4)])
def test_chunking_sends_the_body_with_bdat(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA, pipelining: bool, round_trips: int
) -> None:
    # Given a server offering CHUNKING
    server = start(chunking=True, pipelining=pipelining)
    mail_from, rcpts, raw, _ = mime(text=".a line starting with a dot\n")

    # When a message is sent
    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        result = smtp.send(mail_from, rcpts, raw)

    # Then BDAT carried it unchanged: with pipelining, envelope and body in a single round trip
    assert server.accepted[0].data == raw
    assert result.round_trips == round_trips


@pytest.mark.parametrize("pipelining", [True, False])
def test_lines_starting_with_a_dot_arrive_intact(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA, pipelining: bool
) -> None:
    server = start(pipelining=pipelining)
    mail_from, rcpts, raw, _ = mime(text=".\n..two dots\n.end\n.")

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        smtp.send(mail_from, rcpts, raw)

    assert server.accepted[0].data == raw


def test_ten_messages_share_one_connection_and_one_auth(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    server = start()
    source = TokenSource(tokens.grant())

    with session(server, sandbox_ca, XOAuth2Auth(source)) as smtp:
        for _ in range(10):
            send(smtp)
        assert (smtp.connections_opened, smtp.auth_count) == (1, 1)

    assert len(server.accepted) == 10
    assert (server.connections, server.auth_successes) == (1, 1)
    assert source.calls == [False]


def test_message_after_the_server_hung_up_goes_out_on_a_new_connection(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    # Given a server that answers 421 and closes the connection during the first message
    server = start()
    server.fail("mail", 421, "4.3.2 Service not available, closing transmission channel")

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        first = failure_of(lambda: send(smtp))
        # When the next message is sent on the same session
        send(smtp)
        # Then it connected and authenticated again
        assert (smtp.connections_opened, smtp.auth_count) == (2, 2)

    assert (first.code, first.retryable) == ("throttled", True)
    assert len(server.accepted) == 1
    assert server.connections == 2


def test_message_larger_than_the_advertised_size_is_refused_before_sending(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    server = start(size_limit=2000)

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        failure = failure_of(lambda: send(smtp, text="x" * 3000))

    assert (failure.code, failure.stage) == ("message_too_large", "mail")
    assert server.accepted == []


def test_utf8_address_goes_out_with_smtputf8(start: Any, tokens: Tokens, sandbox_ca: SandboxCA) -> None:
    server = start(smtputf8=True)
    mail_from, rcpts, raw, utf8 = mime(to=["José <josé@example.com>"])

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        smtp.send(mail_from, rcpts, raw, smtputf8=utf8)

    (received,) = server.accepted
    assert received.rcpt_tos == ["josé@example.com"]
    assert "SMTPUTF8" in [o.upper() for o in received.mail_options]
    assert received.data == raw


def test_utf8_address_to_a_server_without_smtputf8_is_an_invalid_message(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    server = start(smtputf8=False)

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        failure = failure_of(lambda: send(smtp, to=["josé@example.com"]))

    assert (failure.code, failure.retryable) == ("invalid_message", False)
    assert server.accepted == []


# --- authentication --------------------------------------------------------------------------------


def test_refused_first_token_is_replaced_once_and_the_fresh_one_succeeds(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    # Given a cached token the server no longer accepts, and a fresh one it does
    server = start()
    source = TokenSource("ya29.revoked-token-from-the-cache", tokens.grant())

    # When a message is sent
    with session(server, sandbox_ca, XOAuth2Auth(source)) as smtp:
        send(smtp)
        assert smtp.auth_count == 2

    # Then the broker was asked once for a forced refresh, and the second AUTH went through
    assert source.calls == [False, True]
    assert (server.auth_attempts, server.auth_successes) == (2, 1)
    assert len(server.accepted) == 1


def test_refused_fresh_token_is_smtp_auth_failed_without_the_token(
    start: Any, sandbox_ca: SandboxCA, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a server that refuses every token
    caplog.set_level(logging.DEBUG)
    server = start()
    source = TokenSource("ya29.first-refused-token-value", "ya29.second-refused-token-value")

    # When a session opens
    failure = failure_of(session(server, sandbox_ca, XOAuth2Auth(source)).open)

    # Then it is smtp_auth_failed after exactly one refresh, and no token is in the error or logs
    assert (failure.code, failure.stage, failure.retryable) == ("smtp_auth_failed", "auth", False)
    assert failure.reply is not None and failure.reply.enhanced == "5.7.3"
    assert source.calls == [False, True]
    assert server.auth_attempts == 2
    for text in (str(failure), repr(failure), str(failure.to_dict()), caplog.text):
        assert "refused-token-value" not in text


def test_gmail_error_challenge_is_answered_and_its_diagnosis_reported(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    # Given a Gmail-style server, which answers a bad token with a 334 JSON challenge
    server = start(gmail_style=True)
    source = TokenSource("ya29.expired-token")

    # When a session opens
    failure = failure_of(session(server, sandbox_ca, XOAuth2Auth(source)).open)

    # Then the challenge was answered, the 535 classified, and Google's status and scope reported
    assert failure.code == "smtp_auth_failed"
    assert failure.reply is not None and (failure.reply.code, failure.reply.enhanced) == (535, "5.7.8")
    assert "status=401" in failure.message
    assert "scope=https://mail.google.com/" in failure.message
    assert source.calls == [False, True]


def test_mailbox_with_smtp_auth_disabled_is_not_retried(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    # Given a mailbox whose SMTP AUTH is switched off (535 5.7.139)
    server = start()
    server.add_mailbox(USER, smtp_auth_disabled=True)
    source = TokenSource(tokens.grant())

    # When a session opens
    failure = failure_of(session(server, sandbox_ca, XOAuth2Auth(source)).open)

    # Then it is smtp_auth_disabled, and no fresh token was asked for (a token cannot fix it)
    assert (failure.code, failure.stage) == ("smtp_auth_disabled", "auth")
    assert "Set-CASMailbox" in failure.hint
    assert source.calls == [False]


def test_send_as_denied_after_the_body_is_classified(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    # Given a mailbox without send-as permission on another address
    server = start()

    # When it sends as that address
    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        failure = failure_of(lambda: send(smtp, **{"from": "ceo@contoso.com"}))

    # Then the 554 5.2.0 after the body is send_as_denied
    assert (failure.code, failure.stage, failure.retryable) == ("send_as_denied", "body", False)
    assert server.accepted == []


def test_basic_auth_uses_plain(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.add_mailbox("relay@contoso.com", password="correct horse battery")

    with session(
        server, sandbox_ca, BasicAuth(SecretStr("correct horse battery")), username="relay@contoso.com"
    ) as smtp:
        send(smtp, **{"from": "relay@contoso.com"})

    assert (server.accepted[0].auth_user, server.accepted[0].mechanism) == ("relay@contoso.com", "PLAIN")


def test_wrong_password_is_smtp_auth_failed_after_one_attempt(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.add_mailbox("relay@contoso.com", password="correct horse battery")
    smtp = session(server, sandbox_ca, BasicAuth(SecretStr("wrong staple")), username="relay@contoso.com")

    failure = failure_of(smtp.open)

    assert failure.code == "smtp_auth_failed"
    assert server.auth_attempts == 1
    assert "wrong staple" not in str(failure.to_dict()) + repr(smtp.auth)


def test_security_none_authenticates_without_tls_only_on_loopback(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    server = start(mode="none")

    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant())), host="127.0.0.1") as smtp:
        send(smtp)

    assert len(server.accepted) == 1


# --- TLS and where credentials go ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_untrusted_certificate_fails_tls_before_any_token_is_fetched(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA, mode: str
) -> None:
    # Given a server presenting a certificate no trusted CA signed
    server = start(mode=mode, trusted_cert=False)
    source = TokenSource(tokens.grant())

    # When a session opens
    failure = failure_of(session(server, sandbox_ca, XOAuth2Auth(source)).open)

    # Then TLS failed, and no token was fetched or sent
    assert (failure.code, failure.retryable) == ("tls_failed", False)
    assert "certificate" in failure.message
    assert source.calls == []
    assert server.auth_attempts == 0


def test_server_without_starttls_gets_no_credential(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    # Given a plaintext server, and an endpoint that requires STARTTLS
    server = start(mode="none")
    source = TokenSource(tokens.grant())

    failure = failure_of(session(server, sandbox_ca, XOAuth2Auth(source), security="starttls").open)

    assert (failure.code, failure.stage) == ("tls_failed", "starttls")
    assert source.calls == []
    assert server.auth_attempts == 0


@pytest.mark.parametrize("host", ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"])
def test_link_local_and_metadata_addresses_are_never_connected(host: str) -> None:
    # Given an endpoint that slipped past validation (or a name that resolves there)
    source = TokenSource("ya29.never-sent")
    endpoint = SmtpEndpoint.model_construct(host=host, port=587, security="starttls", timeout_seconds=1)

    # When a session opens, then it refuses before connecting
    failure = failure_of(SmtpSession(endpoint, username=USER, auth=XOAuth2Auth(source)).open)
    assert (failure.code, failure.stage) == ("address_not_allowed", "connect")
    assert source.calls == []
    with pytest.raises(AddressNotAllowed):
        connect_vetted(host, 587, 1, loopback_only=False)


# --- server replies and dropped connections --------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "code", "text", "expected", "failed_at"),
    [
        ("greeting", 421, "4.3.2 Service not available", "throttled", "greeting"),
        ("auth", 454, "4.7.0 Temporary authentication failure", "throttled", "auth"),
        ("mail", 432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", "throttled", "mail"),
        ("mail", 451, "4.7.500 Server busy. Please try again later", "throttled", "mail"),
        ("mail", 421, "4.7.0 Too many connections", "throttled", "mail"),
        ("mail", 451, "4.3.0 Temporary server error", "smtp_transient", "mail"),
        ("data", 451, "4.3.0 Temporary server error", "smtp_transient", "data"),
        ("eod", 554, "5.7.1 Message rejected as spam", "smtp_permanent", "body"),
        ("eod", 552, "5.3.4 Message size exceeds fixed maximum", "message_too_large", "body"),
    ],
)
def test_server_reply_is_classified_at_its_stage(
    start: Any,
    tokens: Tokens,
    sandbox_ca: SandboxCA,
    stage: str,
    code: int,
    text: str,
    expected: str,
    failed_at: str,
) -> None:
    server = start(chunking=stage != "data")  # a DATA refusal needs DATA
    server.fail(stage, code, text)

    def deliver() -> None:
        with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
            send(smtp)

    failure = failure_of(deliver)

    assert (failure.code, failure.stage) == (expected, failed_at)
    assert failure.reply is not None and failure.reply.code == code
    assert server.accepted == []


@pytest.mark.parametrize("chunking", [False, True])
def test_connection_dropped_while_the_body_is_sent_is_transient(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA, chunking: bool
) -> None:
    # Given a server that hangs up as the body starts to arrive, and a body larger than socket buffers
    server = start(chunking=chunking)
    server.fail("disconnect_mid_data")
    body = b"Subject: large\r\n\r\n" + (b"x" * 998 + b"\r\n") * 16_000

    # When it is sent
    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        failure = failure_of(lambda: smtp.send(USER, ["ana@example.com"], body))

    # Then the server never had the whole message: retry
    assert (failure.code, failure.retryable) == ("smtp_transient", True)
    assert server.accepted == []


@pytest.mark.parametrize("chunking", [False, True])
def test_connection_dropped_after_the_end_of_data_is_delivery_uncertain(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA, chunking: bool
) -> None:
    # Given a server that stores the message and hangs up before replying
    server = start(chunking=chunking)
    server.fail("disconnect_after_eod")

    # When it is sent
    with session(server, sandbox_ca, XOAuth2Auth(TokenSource(tokens.grant()))) as smtp:
        failure = failure_of(lambda: send(smtp))

    # Then it is not retried: the server may (and here did) take it
    assert (failure.code, failure.retryable) == ("delivery_uncertain", False)
    assert len(server.accepted) == 1


class IdleClosingServer:
    """A plain aiosmtpd server on loopback that drops connections idle for ``idle`` seconds, as
    providers do between a sender's messages (no TLS: it is reached with security 'none')."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.connections = 0
        self.delivered: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.delivered.append(envelope.original_content)
        return "250 2.0.0 OK"

    def _session(self) -> SMTP:
        self.connections += 1
        return SMTP(
            self,
            hostname="idle.sandbox.local",
            timeout=self.idle,
            auth_require_tls=False,
            authenticator=lambda *_: AuthResult(success=True),
            loop=self.loop,
        )

    def __enter__(self) -> IdleClosingServer:
        self.thread.start()
        create = self.loop.create_server(self._session, "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(create, self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        # asyncio is not thread-safe: the server is closed on its own loop's thread.
        async def close() -> None:
            self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def idle_closing_server() -> Iterator[IdleClosingServer]:
    with IdleClosingServer(idle=0.3) as server:
        yield server


def test_connection_the_server_dropped_while_idle_is_replaced_for_the_next_message(
    idle_closing_server: IdleClosingServer,
) -> None:
    # Given a session that sent a message, then sat idle until the server closed the connection
    server = idle_closing_server
    endpoint = SmtpEndpoint(host="127.0.0.1", port=server.port, security="none", timeout_seconds=5)
    with SmtpSession(endpoint, username="relay", auth=BasicAuth(SecretStr("pw"))) as smtp:
        send(smtp)
        time.sleep(server.idle + 0.3)

        # When the next message is sent
        send(smtp)

        # Then it went out on a new, re-authenticated connection
        assert (smtp.connections_opened, smtp.auth_count) == (2, 2)
    assert server.connections == 2
    assert len(server.delivered) == 2


# --- the live check --------------------------------------------------------------------------------


def test_check_reports_every_step_without_sending_mail(
    start: Any, tokens: Tokens, sandbox_ca: SandboxCA
) -> None:
    server = start()

    steps = run_check(
        endpoint(server), USER, XOAuth2Auth(TokenSource(tokens.grant())), sandbox_ca.client_context()
    )

    assert [(s.name, s.ok) for s in steps] == [
        ("connect", True),
        ("tls", True),
        ("ehlo", True),
        ("auth", True),
        ("quit", True),
    ]
    assert "XOAUTH2" in steps[2].detail
    assert "certificate verified" in steps[1].detail
    assert server.accepted == []
    assert server.auth_successes == 1


def test_check_stops_at_the_failing_step_with_code_and_hint(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    token = "ya29.not-a-token-the-server-knows"

    steps = run_check(endpoint(server), USER, XOAuth2Auth(TokenSource(token)), sandbox_ca.client_context())

    assert [(s.name, s.ok) for s in steps] == [
        ("connect", True),
        ("tls", True),
        ("ehlo", True),
        ("auth", False),
    ]
    assert steps[-1].code == "smtp_auth_failed"
    assert "New-ServicePrincipal" in (steps[-1].hint or "")
    assert token not in str([s.to_dict() for s in steps])


def test_check_reports_an_untrusted_certificate_at_the_tls_step(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start(trusted_cert=False)

    steps = run_check(endpoint(server), USER, XOAuth2Auth(TokenSource("x")), sandbox_ca.client_context())

    assert [(s.name, s.ok, s.code) for s in steps] == [("connect", True, None), ("tls", False, "tls_failed")]


def test_check_fails_at_ehlo_when_the_server_does_not_offer_xoauth2(
    idle_closing_server: IdleClosingServer,
) -> None:
    # Given a server offering AUTH PLAIN and LOGIN only
    server = idle_closing_server
    endpoint = SmtpEndpoint(host="127.0.0.1", port=server.port, security="none", timeout_seconds=5)
    source = TokenSource("ya29.never-sent")

    # When an XOAUTH2 integration is checked against it
    steps = run_check(endpoint, USER, XOAuth2Auth(source))

    # Then the EHLO step says so, and no token was fetched
    assert [(s.name, s.ok) for s in steps] == [("connect", True), ("tls", True), ("ehlo", False)]
    assert steps[-1].code == "smtp_auth_failed"
    assert "PLAIN" in steps[-1].detail
    assert source.calls == []
