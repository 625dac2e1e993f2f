"""The sandbox SMTP server against real clients on loopback: smtplib, and raw sockets where
smtplib cannot go (pipelining in one write, BDAT, a confused client)."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import smtplib
import socket
import ssl
import time
import uuid
from typing import Any

import pytest
import requests

from mailbroker_sandbox.ca import SandboxCA
from mailbroker_sandbox.smtp_server import (
    AUTH_DISABLED,
    SEND_AS_DENIED,
    HttpIntrospector,
    SandboxSmtpServer,
)

MAILBOX = "support@contoso.com"
PASSWORD = "correct horse battery staple"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
MESSAGE = b"From: Support <support@contoso.com>\r\nTo: ana@example.com\r\nSubject: Hello\r\n\r\nHi Ana\r\n"


class TokenRegistry:
    """The ``verify_token`` callable of these tests: introspection claims by token."""

    def __init__(self) -> None:
        self._claims: dict[str, dict[str, Any]] = {}

    def issue(self, **claims: Any) -> str:
        token = "eyJ" + secrets.token_urlsafe(1500)  # as long as an Entra ID access token
        self._claims[token] = {"active": True, "exp": time.time() + 300, **claims}
        return token

    def microsoft_app(self, **overrides: Any) -> str:
        claims = {
            "provider": "microsoft",
            "client_id": CLIENT_ID,
            "sub": None,
            "scope": "https://outlook.office365.com/.default",
            "aud": "https://outlook.office365.com",
            "roles": ["SMTP.SendAsApp"],
            "tid": "contoso",
        }
        return self.issue(**{**claims, **overrides})

    def google_user(self, user: str = MAILBOX, **overrides: Any) -> str:
        claims = {
            "provider": "google",
            "client_id": "g-client",
            "sub": user,
            "scope": "https://mail.google.com/",
        }
        return self.issue(**{**claims, **overrides})

    def __call__(self, token: str) -> dict[str, Any] | None:
        claims = self._claims.get(token)
        return dict(claims) if claims else None


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def connect(server: SandboxSmtpServer, ca: SandboxCA) -> smtplib.SMTP:
    """An smtplib client past EHLO, and past STARTTLS in starttls mode."""
    client: smtplib.SMTP
    if server.mode == "tls":
        client = smtplib.SMTP_SSL(server.host, server.port, context=ca.client_context(), timeout=5)
    else:
        client = smtplib.SMTP(server.host, server.port, timeout=5)
    client.ehlo()
    if server.mode == "starttls":
        client.starttls(context=ca.client_context())
        client.ehlo()
    return client


def logged_in(server: SandboxSmtpServer, ca: SandboxCA) -> smtplib.SMTP:
    client = connect(server, ca)
    client.login(MAILBOX, PASSWORD)
    return client


class RawSession:
    """A line-level SMTP client on a socket: sends bytes exactly as given, reads whole replies."""

    def __init__(self, server: SandboxSmtpServer, ca: SandboxCA) -> None:
        self.ca = ca
        self.sock: socket.socket = socket.create_connection((server.host, server.port), timeout=5)
        self.reader = self.sock.makefile("rb")
        assert self.reply()[0] == 220

    @classmethod
    def logged_in(cls, server: SandboxSmtpServer, ca: SandboxCA) -> RawSession:
        raw = cls(server, ca)
        raw.command("EHLO client.test")
        assert raw.command("STARTTLS")[0] == 220
        raw.sock = ca.client_context().wrap_socket(raw.sock, server_hostname=server.host)
        raw.reader = raw.sock.makefile("rb")
        raw.command("EHLO client.test")
        assert raw.command("AUTH PLAIN " + b64(f"\0{MAILBOX}\0{PASSWORD}"))[0] == 235
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            lines.append(line[4:].rstrip(b"\r\n").decode())
            if line[3:4] == b" ":
                return int(line[:3]), lines

    def command(self, line: str) -> tuple[int, list[str]]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def tokens() -> TokenRegistry:
    return TokenRegistry()


@pytest.fixture
def start(smtp_server: Any, tokens: TokenRegistry) -> Any:
    """Start a sandbox SMTP server that knows the test's tokens and the MAILBOX (with a password)."""

    def start(**kwargs: Any) -> SandboxSmtpServer:
        server: SandboxSmtpServer = smtp_server(verify_token=tokens, **kwargs)
        server.add_mailbox(MAILBOX, password=PASSWORD)
        return server

    return start


# --- EHLO, STARTTLS, implicit TLS -----------------------------------------------------------------


def test_ehlo_before_starttls_offers_starttls_and_no_auth(start: Any) -> None:
    server = start()
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")


def test_ehlo_after_starttls_offers_xoauth2_plain_login_and_the_extensions(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start(chunking=True, size_limit=1234)
    with connect(server, sandbox_ca) as client:
        assert client.esmtp_features["auth"].split() == ["XOAUTH2", "PLAIN", "LOGIN"]
        assert client.esmtp_features["size"] == "1234"
        for extension in ("8bitmime", "smtputf8", "pipelining", "chunking", "enhancedstatuscodes"):
            assert client.has_extn(extension), extension
        assert not client.has_extn("starttls")


def test_disabled_extensions_are_not_offered(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start(pipelining=False, chunking=False, smtputf8=False)
    with connect(server, sandbox_ca) as client:
        for extension in ("pipelining", "chunking", "smtputf8"):
            assert not client.has_extn(extension), extension


def test_auth_before_starttls_is_refused(start: Any, tokens: TokenRegistry) -> None:
    server = start()
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo()
        reply = client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, tokens.microsoft_app()))
    assert reply == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert server.auth_successes == 0


def test_mail_before_auth_is_refused(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    with connect(server, sandbox_ca) as client:
        code, _ = client.mail(MAILBOX)
    assert code == 530


def test_implicit_tls_mode_speaks_tls_from_the_first_byte(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start(mode="tls")
    with connect(server, sandbox_ca) as client:
        assert not client.has_extn("starttls")
        client.login(MAILBOX, PASSWORD)
        client.sendmail(MAILBOX, ["ana@example.com"], MESSAGE)
    assert [m.data for m in server.accepted] == [MESSAGE]


def test_starttls_with_the_untrusted_certificate_fails_verification(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start(trusted_cert=False)
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=sandbox_ca.client_context())


def test_implicit_tls_with_the_untrusted_certificate_fails_verification(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start(mode="tls", trusted_cert=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(server.host, server.port, context=sandbox_ca.client_context(), timeout=5)


def test_mode_none_offers_auth_without_tls(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start(mode="none")
    with connect(server, sandbox_ca) as client:
        assert not client.has_extn("starttls")
        assert client.login(MAILBOX, PASSWORD)[0] == 235


# --- XOAUTH2 ---------------------------------------------------------------------------------------


def test_xoauth2_app_token_of_a_permitted_client_authenticates_and_sends(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start()
    server.add_mailbox(MAILBOX, allowed_clients=[CLIENT_ID])
    token = tokens.microsoft_app()
    with connect(server, sandbox_ca) as client:
        reply = client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, token))
        client.sendmail(MAILBOX, ["ana@example.com"], MESSAGE)
    assert reply == (235, b"2.7.0 Authentication successful")
    [message] = server.accepted
    assert (message.auth_user, message.mechanism, message.rcpt_tos) == (
        MAILBOX,
        "XOAUTH2",
        ["ana@example.com"],
    )
    assert message.session_id


def test_xoauth2_user_token_authenticates_its_own_mailbox_whatever_the_case(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start()
    token = tokens.google_user(sub="Support@Contoso.com")
    with connect(server, sandbox_ca) as client:
        code, _ = client.docmd("AUTH", "XOAUTH2 " + xoauth2("SUPPORT@contoso.com", token))
    assert code == 235


def test_xoauth2_continuation_form_authenticates(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start()
    with connect(server, sandbox_ca) as client:
        challenge = client.docmd("AUTH", "XOAUTH2")
        reply = client.docmd(xoauth2(MAILBOX, tokens.google_user()))
    assert challenge == (334, b"")
    assert reply[0] == 235


def test_smtplib_auth_with_xoauth2_authobject_authenticates(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start()
    token = tokens.microsoft_app()
    payload = f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01"
    with connect(server, sandbox_ca) as client:
        code, _ = client.auth("XOAUTH2", lambda challenge=None: payload if challenge is None else "")
    assert code == 235


REFUSED_TOKENS = {
    "token for another user": lambda t: t.google_user(sub="someone.else@contoso.com"),
    "inactive token": lambda t: t.microsoft_app(active=False),
    "expired token": lambda t: t.microsoft_app(exp=time.time() - 1),
    "microsoft token without SMTP.SendAsApp": lambda t: t.microsoft_app(roles=["Mail.Send"]),
    "microsoft token for another audience": lambda t: t.microsoft_app(aud="https://graph.microsoft.com"),
    "client without mailbox permission": lambda t: t.microsoft_app(client_id="not-allowed"),
    "google token without the mail scope": lambda t: t.google_user(scope="openid email"),
    "token the provider never issued": lambda t: "eyJ" + secrets.token_urlsafe(40),
}


@pytest.mark.parametrize("make_token", REFUSED_TOKENS.values(), ids=REFUSED_TOKENS.keys())
def test_xoauth2_refuses_tokens_that_may_not_use_the_mailbox_with_535_5_7_3(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA, make_token: Any
) -> None:
    server = start()
    server.add_mailbox(MAILBOX, allowed_clients=[CLIENT_ID])
    with connect(server, sandbox_ca) as client:
        reply = client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, make_token(tokens)))
    assert reply == (535, b"5.7.3 Authentication unsuccessful")
    assert server.auth_successes == 0


def test_xoauth2_for_an_unknown_mailbox_is_refused_with_535_5_7_3(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start()
    with connect(server, sandbox_ca) as client:
        reply = client.docmd("AUTH", "XOAUTH2 " + xoauth2("nobody@contoso.com", tokens.microsoft_app()))
    assert reply == (535, b"5.7.3 Authentication unsuccessful")


def test_xoauth2_for_a_mailbox_with_smtp_auth_disabled_is_refused_with_5_7_139(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start()
    server.add_mailbox(MAILBOX, smtp_auth_disabled=True)
    with connect(server, sandbox_ca) as client:
        code, text = client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, tokens.microsoft_app()))
    assert f"{code} {text.decode()}" == AUTH_DISABLED


def test_gmail_style_refusal_sends_the_error_challenge_then_a_multiline_535(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start(gmail_style=True)
    with connect(server, sandbox_ca) as client:
        code, challenge = client.docmd(
            "AUTH", "XOAUTH2 " + xoauth2(MAILBOX, tokens.google_user(active=False))
        )
        final = client.docmd("")
    assert code == 334
    assert json.loads(base64.b64decode(challenge)) == {
        "status": "401",
        "schemes": "bearer",
        "scope": "https://mail.google.com/",
    }
    assert final[0] == 535
    first, second = final[1].decode().split("\n")
    assert first == "5.7.8 Username and Password not accepted. For more information, go to"
    assert second.startswith("5.7.8  https://support.google.com/mail/?p=BadCredentials")


def test_gmail_style_refusal_surfaces_as_smtplib_authentication_error(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start(gmail_style=True)
    payload = f"user={MAILBOX}\x01auth=Bearer {tokens.google_user(sub='other@contoso.com')}\x01\x01"
    with connect(server, sandbox_ca) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("XOAUTH2", lambda challenge=None: payload if challenge is None else "")
        assert client.noop()[0] == 250  # the dialogue is still in step
    assert refused.value.smtp_code == 535
    assert refused.value.smtp_error.startswith(b"5.7.8 Username and Password not accepted")


def test_xoauth2_token_from_the_sandbox_token_endpoint_is_verified_over_https_by_default(
    smtp_server: Any, token_server: Any, sandbox_ca: SandboxCA
) -> None:
    tenant, client_id, secret = "contoso", str(uuid.uuid4()), secrets.token_urlsafe(24)
    token_server.register_microsoft_app(tenant, client_id, secret)
    issued = requests.post(
        token_server.microsoft_token_url(tenant),
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": secret,
            "scope": "https://outlook.office365.com/.default",
        },
        verify=str(sandbox_ca.ca_cert),
        timeout=5,
    )
    issued.raise_for_status()
    server = smtp_server()
    server.add_mailbox(MAILBOX, allowed_clients=[client_id])
    server.add_mailbox("other@contoso.com", allowed_clients=["another-app"])
    token = issued.json()["access_token"]
    with connect(server, sandbox_ca) as client:
        other = client.docmd("AUTH", "XOAUTH2 " + xoauth2("other@contoso.com", token))
        mine = client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, token))
    assert other[0] == 535
    assert mine[0] == 235


def test_http_introspector_answers_none_for_a_token_the_endpoint_does_not_know(
    token_introspector: HttpIntrospector,
) -> None:
    assert token_introspector("eyJ" + secrets.token_urlsafe(40)) is None


# --- PLAIN and LOGIN -------------------------------------------------------------------------------


def test_auth_plain_with_the_mailbox_password_authenticates(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    with connect(server, sandbox_ca) as client:
        reply = client.docmd("AUTH", "PLAIN " + b64(f"\0{MAILBOX}\0{PASSWORD}"))
        client.sendmail(MAILBOX, ["ana@example.com"], MESSAGE)
    assert reply == (235, b"2.7.0 Authentication successful")
    assert server.accepted[0].mechanism == "PLAIN"


def test_auth_login_with_the_mailbox_password_authenticates(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    with connect(server, sandbox_ca) as client:
        client.user, client.password = MAILBOX, PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    assert code == 235


def test_auth_plain_with_a_wrong_password_is_refused(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    with connect(server, sandbox_ca) as client:
        reply = client.docmd("AUTH", "PLAIN " + b64(f"\0{MAILBOX}\0not the password"))
    assert reply == (535, b"5.7.3 Authentication unsuccessful")


def test_gmail_style_password_refusal_is_the_multiline_535_5_7_8(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start(gmail_style=True)
    with connect(server, sandbox_ca) as client:
        code, text = client.docmd("AUTH", "PLAIN " + b64(f"\0{MAILBOX}\0not the password"))
    assert code == 535
    assert text.decode().split("\n")[0] == (
        "5.7.8 Username and Password not accepted. For more information, go to"
    )


def test_auth_plain_for_a_mailbox_with_smtp_auth_disabled_is_refused_with_5_7_139(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start()
    server.add_mailbox(MAILBOX, password=PASSWORD, smtp_auth_disabled=True)
    with connect(server, sandbox_ca) as client:
        code, text = client.docmd("AUTH", "PLAIN " + b64(f"\0{MAILBOX}\0{PASSWORD}"))
    assert f"{code} {text.decode()}" == AUTH_DISABLED


# --- PIPELINING and CHUNKING -------------------------------------------------------------------------


def test_pipelined_commands_in_one_write_are_answered_in_order(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("rcpt", 550, "5.1.1 User unknown", recipient="nobody@example.com")
    raw = RawSession.logged_in(server, sandbox_ca)
    raw.send(
        b"MAIL FROM:<support@contoso.com>\r\n"
        b"RCPT TO:<ana@example.com>\r\n"
        b"RCPT TO:<nobody@example.com>\r\n"
        b"DATA\r\n"
    )
    replies = [raw.reply() for _ in range(4)]
    raw.send(MESSAGE + b".\r\n")
    final = raw.reply()
    raw.close()
    assert [code for code, _ in replies] == [250, 250, 550, 354]
    assert replies[2][1] == ["5.1.1 User unknown"]
    assert final[0] == 250
    assert server.accepted[0].rcpt_tos == ["ana@example.com"]


def test_bdat_chunks_in_one_write_are_acknowledged_and_stored_exactly(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start(chunking=True)
    first, last = b"Subject: chunks\r\n\r\n.a line\r\n", b".\r\nthe end\r\n"
    raw = RawSession.logged_in(server, sandbox_ca)
    raw.send(
        b"MAIL FROM:<support@contoso.com>\r\nRCPT TO:<ana@example.com>\r\n"
        + f"BDAT {len(first)}\r\n".encode()
        + first
        + f"BDAT {len(last)} LAST\r\n".encode()
        + last
    )
    replies = [raw.reply() for _ in range(4)]
    raw.close()
    assert [code for code, _ in replies] == [250, 250, 250, 250]
    assert replies[2][1] == [f"2.0.0 {len(first)} octets received"]
    [message] = server.accepted
    assert replies[3][1] == [f"2.0.0 OK <{message.queue_id}>"]
    assert message.data == first + last


def test_bdat_over_the_size_limit_is_refused_and_the_dialogue_stays_in_step(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start(chunking=True, size_limit=100)
    raw = RawSession.logged_in(server, sandbox_ca)
    raw.command("MAIL FROM:<support@contoso.com>")
    raw.command("RCPT TO:<ana@example.com>")
    raw.send(b"BDAT 150 LAST\r\n" + b"x" * 150)
    refused = raw.reply()
    after = raw.command("NOOP")
    raw.close()
    assert refused == (552, ["5.3.4 Message size exceeds fixed maximum message size"])
    assert after[0] == 250
    assert server.accepted == []


def test_bdat_is_not_recognised_when_chunking_is_off(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start(chunking=False)
    raw = RawSession.logged_in(server, sandbox_ca)
    raw.command("MAIL FROM:<support@contoso.com>")
    raw.command("RCPT TO:<ana@example.com>")
    code, _ = raw.command("BDAT 0 LAST")
    raw.close()
    assert code == 500


# --- faults ------------------------------------------------------------------------------------------


def test_greeting_fault_answers_instead_of_220_and_closes(start: Any) -> None:
    server = start()
    server.fail("greeting", 421, "4.3.2 Service not available")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(server.host, server.port, timeout=5)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (421, b"4.3.2 Service not available")


def test_ehlo_fault_answers_instead_of_the_extensions(start: Any) -> None:
    server = start()
    server.fail("ehlo", 554, "5.7.1 Access denied")
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        assert client.ehlo() == (554, b"5.7.1 Access denied")


def test_starttls_fault_answers_instead_of_220(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("starttls", 454, "4.7.0 TLS not available due to temporary reason")
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPResponseException) as refused:
            client.starttls(context=sandbox_ca.client_context())
    assert refused.value.smtp_code == 454


def test_auth_fault_421_answers_and_closes_the_connection(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("auth", 421, "4.7.0 Too many connections")
    with connect(server, sandbox_ca) as client:
        reply = client.docmd("AUTH", "PLAIN " + b64(f"\0{MAILBOX}\0{PASSWORD}"))
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    assert reply == (421, b"4.7.0 Too many connections")
    assert server.auth_successes == 0


def test_mail_fault_answers_mail_from(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("mail", 432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")
    with logged_in(server, sandbox_ca) as client:
        assert client.mail(MAILBOX) == (432, b"4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")
        assert client.mail(MAILBOX)[0] == 250


def test_rcpt_fault_for_one_recipient_refuses_only_that_recipient(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("rcpt", 550, "5.1.1 User unknown", recipient="bo@example.com")
    with logged_in(server, sandbox_ca) as client:
        refused = client.sendmail(MAILBOX, ["ana@example.com", "bo@example.com"], MESSAGE)
    assert refused == {"bo@example.com": (550, b"5.1.1 User unknown")}
    assert server.accepted[0].rcpt_tos == ["ana@example.com"]


def test_data_fault_answers_instead_of_354(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("data", 451, "4.7.500 Server busy")
    with logged_in(server, sandbox_ca) as client:
        client.mail(MAILBOX)
        client.rcpt("ana@example.com")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.data(MESSAGE)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (451, b"4.7.500 Server busy")
    assert server.accepted == []


def test_end_of_data_fault_refuses_the_message(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("eod", 450, "4.2.1 Mailbox temporarily unavailable")
    with logged_in(server, sandbox_ca) as client:
        client.mail(MAILBOX)
        client.rcpt("ana@example.com")
        assert client.data(MESSAGE) == (450, b"4.2.1 Mailbox temporarily unavailable")
    assert server.accepted == []


def test_disconnect_mid_data_drops_the_connection_and_stores_nothing(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start()
    server.fail("disconnect_mid_data")
    with logged_in(server, sandbox_ca) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail(MAILBOX, ["ana@example.com"], MESSAGE)
    assert server.accepted == []


def test_disconnect_after_end_of_data_stores_the_message_but_never_replies(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start()
    server.fail("disconnect_after_eod")
    with logged_in(server, sandbox_ca) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail(MAILBOX, ["ana@example.com"], MESSAGE)
    assert [m.data for m in server.accepted] == [MESSAGE]


def test_slow_fault_delays_the_answer_at_its_stage(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("slow", text="mail", delay=0.3)
    with logged_in(server, sandbox_ca) as client:
        began = time.monotonic()
        code, _ = client.mail(MAILBOX)
        elapsed = time.monotonic() - began
    assert code == 250
    assert elapsed >= 0.3


def test_fault_fires_the_given_number_of_times(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("mail", 451, "4.3.0 busy", times=2)
    with logged_in(server, sandbox_ca) as client:
        codes = [client.mail(MAILBOX)[0] for _ in range(3)]
    assert codes == [451, 451, 250]


def test_cleared_faults_never_fire(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.fail("mail", 451, "4.3.0 busy")
    server.clear_faults()
    with logged_in(server, sandbox_ca) as client:
        assert client.mail(MAILBOX)[0] == 250


def test_fault_at_an_unknown_stage_is_rejected(start: Any) -> None:
    server = start()
    with pytest.raises(ValueError, match="unknown stage"):
        server.fail("quit", 421)


# --- SendAs and sizes -------------------------------------------------------------------------------


def test_envelope_sender_the_mailbox_may_not_send_as_is_refused_after_end_of_data(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start()
    with logged_in(server, sandbox_ca) as client:
        client.mail("ceo@contoso.com")
        client.rcpt("ana@example.com")
        code, text = client.data(MESSAGE)
    assert f"{code} {text.decode()}" == SEND_AS_DENIED
    assert server.accepted == []


def test_from_header_the_mailbox_may_not_send_as_is_refused(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    with logged_in(server, sandbox_ca) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(MAILBOX, ["ana@example.com"], MESSAGE.replace(b"support@", b"ceo@"))
    assert refused.value.smtp_code == 554
    assert b"SendAsDeniedException" in refused.value.smtp_error


def test_send_as_grant_lets_the_mailbox_send_as_the_other_address(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    server.add_mailbox(MAILBOX, password=PASSWORD, send_as=["news@contoso.com"])
    with logged_in(server, sandbox_ca) as client:
        client.sendmail("news@contoso.com", ["ana@example.com"], MESSAGE.replace(b"support@", b"news@"))
    assert server.accepted[0].mail_from == "news@contoso.com"


def test_mail_size_parameter_over_the_limit_is_refused_with_552_5_3_4(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start(size_limit=1000)
    with logged_in(server, sandbox_ca) as client:
        reply = client.mail(MAILBOX, ["SIZE=1001"])
    assert reply == (552, b"5.3.4 Message size exceeds fixed maximum message size")


def test_body_over_the_limit_is_refused_with_552_5_3_4(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start(size_limit=1000)
    with logged_in(server, sandbox_ca) as client:
        client.mail(MAILBOX)
        client.rcpt("ana@example.com")
        reply = client.data(MESSAGE + (b"x" * 70 + b"\r\n") * 20)
        assert client.noop()[0] == 250
    assert reply == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    assert server.accepted == []


def test_line_longer_than_rfc_5321_allows_is_refused(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    with logged_in(server, sandbox_ca) as client:
        client.mail(MAILBOX)
        client.rcpt("ana@example.com")
        code, _ = client.data(MESSAGE + b"y" * 1200 + b"\r\n")
    assert code == 500
    assert server.accepted == []


# --- what is stored -----------------------------------------------------------------------------------


def test_stored_data_is_exactly_the_bytes_sent_after_dot_unstuffing(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start()
    body = (
        b"From: support@contoso.com\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\n"
        b".a line that starts with a dot\r\n..two dots\r\n.\r\ncaf\xc3\xa9 \xe2\x9c\x93\r\n"
    )
    with logged_in(server, sandbox_ca) as client:
        client.sendmail(MAILBOX, ["josé@example.com"], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    [message] = server.accepted
    assert message.data == body
    assert message.rcpt_tos == ["josé@example.com"]
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(message.mail_options)


def test_every_accepted_message_gets_its_own_queue_id_in_the_reply(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    replies = []
    with logged_in(server, sandbox_ca) as client:
        for _ in range(2):
            client.mail(MAILBOX)
            client.rcpt("ana@example.com")
            replies.append(client.data(MESSAGE))
    first, second = server.accepted
    assert first.queue_id != second.queue_id
    assert replies == [
        (250, f"2.0.0 OK <{first.queue_id}>".encode()),
        (250, f"2.0.0 OK <{second.queue_id}>".encode()),
    ]


# --- counters --------------------------------------------------------------------------------------


def test_counters_count_connections_auth_attempts_and_successes(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA
) -> None:
    server = start()
    with connect(server, sandbox_ca) as client:
        client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, tokens.microsoft_app(active=False)))
        client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, tokens.microsoft_app()))
    with connect(server, sandbox_ca):
        pass
    assert (server.connections, server.auth_attempts, server.auth_successes) == (2, 2, 1)


def test_max_concurrent_is_the_peak_of_simultaneous_sessions_per_user(
    start: Any, sandbox_ca: SandboxCA
) -> None:
    server = start()
    server.add_mailbox("other@contoso.com", password=PASSWORD)
    sessions = [logged_in(server, sandbox_ca) for _ in range(3)]
    other = connect(server, sandbox_ca)
    other.login("other@contoso.com", PASSWORD)
    for session in [*sessions, other]:
        session.quit()
    with logged_in(server, sandbox_ca):
        pass
    assert server.max_concurrent == {MAILBOX: 3, "other@contoso.com": 1}


def test_sessions_one_after_another_never_count_as_concurrent(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    for _ in range(3):
        with logged_in(server, sandbox_ca):
            pass
    assert server.max_concurrent == {MAILBOX: 1}


def test_reset_forgets_messages_counters_and_faults(start: Any, sandbox_ca: SandboxCA) -> None:
    server = start()
    with logged_in(server, sandbox_ca) as client:
        client.sendmail(MAILBOX, ["ana@example.com"], MESSAGE)
    server.fail("mail", 451, "4.3.0 busy")
    server.reset()
    assert (server.accepted, server.connections, server.auth_attempts, server.auth_successes) == ([], 0, 0, 0)
    assert server.max_concurrent == {}
    with logged_in(server, sandbox_ca) as client:
        assert client.mail(MAILBOX)[0] == 250


# --- secrets -------------------------------------------------------------------------------------


def test_tokens_and_passwords_never_reach_the_logs(
    start: Any, tokens: TokenRegistry, sandbox_ca: SandboxCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start()
    good, bad = tokens.microsoft_app(), tokens.microsoft_app(active=False)
    with connect(server, sandbox_ca) as client:
        client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, bad))
        client.docmd("AUTH", "XOAUTH2 " + xoauth2(MAILBOX, good))
        client.sendmail(MAILBOX, ["ana@example.com"], MESSAGE)
    with connect(server, sandbox_ca) as client:
        client.user, client.password = MAILBOX, PASSWORD
        client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    # A confused client: sends its password after AUTH was refused, as if it were a command.
    raw = RawSession(server, sandbox_ca)
    raw.command("EHLO client.test")
    raw.command("AUTH LOGIN")
    raw.command(b64(PASSWORD))
    raw.close()

    secrets_seen = [good, bad, PASSWORD, b64(PASSWORD), xoauth2(MAILBOX, good), xoauth2(MAILBOX, bad)]
    assert "authenticated with XOAUTH2" in caplog.text  # the logs were captured
    for secret in secrets_seen:
        assert secret not in caplog.text
