"""The SMTP transport: one authenticated connection to one integration's server.

Built on ``smtplib``: TLS (STARTTLS or implicit), EHLO and the SASL exchange are smtplib's; this
module adds what a sender of other people's mail needs on top:

- where a credential may go: the host's addresses are resolved once, refused when any is
  link-local or instance metadata, and only those vetted addresses are connected to; a token or
  password is sent only over TLS, or to a loopback peer when ``security`` is ``none``;
- certificates are always verified (``ssl.create_default_context()``, which honours
  ``SSL_CERT_FILE``); a server without STARTTLS gets no credential;
- one forced token refresh when the server answers 535 to the first token;
- transactions on a reused connection (RSET, reconnect once when the server closed it between
  messages), pipelined when offered (``pipelining.py``);
- every failure raised as a classified ``SmtpFailure`` with its ``stage``; credentials never in
  an exception.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from mailbroker.errors import (
    AddressNotAllowed,
    MailbrokerError,
    SmtpFailure,
    SmtpReply,
    classify_smtp_reply,
    smtp_connection_failure,
)
from mailbroker.integrations import SmtpEndpoint, is_forbidden_address, is_loopback_host
from mailbroker.smtp.pipelining import ConnectionLost, Transaction, peer_has_spoken, run_transaction
from mailbroker.smtp.xoauth2 import Authenticator, AuthRejected, CredentialUnusable

_ENVELOPE_ADDRESS = re.compile(r"[^\s<>]+@[^\s<>]+")
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
CHECK_STEPS = ("connect", "tls", "ehlo", "auth", "quit")


@dataclass(frozen=True)
class SendResult:
    """A message the server took: its final reply, and who it was accepted for."""

    reply: SmtpReply
    accepted: list[str]
    refused: dict[str, SmtpReply] = field(default_factory=dict)
    round_trips: int = 0


@dataclass(frozen=True)
class CheckStep:
    """One step of a live check (connect, tls, ehlo, auth, quit)."""

    name: str
    ok: bool
    detail: str = ""
    code: str | None = None
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.code:
            body["code"] = self.code
            body["hint"] = self.hint
        return body


def _forbidden(ip: str) -> bool:
    if is_forbidden_address(ip):
        return True
    try:
        mapped = getattr(ipaddress.ip_address(ip.split("%", 1)[0]), "ipv4_mapped", None)
    except ValueError:
        return False
    return mapped is not None and is_forbidden_address(str(mapped))


def _is_loopback_ip(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def connect_vetted(host: str, port: int, timeout: float, *, loopback_only: bool) -> socket.socket:
    """A TCP connection to ``host``, made only to addresses that may receive credentials."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ips = [str(info[4][0]) for info in infos]
    if any(_forbidden(ip) for ip in ips):
        raise AddressNotAllowed(f"{host} resolves to a link-local or instance-metadata address")
    if loopback_only and not all(_is_loopback_ip(ip) for ip in ips):
        raise AddressNotAllowed(f"security 'none' requires a loopback host; {host} is not only loopback")
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last or OSError(f"{host} has no address")


class _Client(smtplib.SMTP):
    """``smtplib.SMTP`` whose socket goes only to vetted addresses, with implicit TLS when given
    a context (what ``smtplib.SMTP_SSL`` does, on the vetted socket)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        local_hostname: str,
        timeout: float,
        implicit_tls: ssl.SSLContext | None,
        loopback_only: bool,
    ) -> None:
        self._implicit_tls = implicit_tls
        self._loopback_only = loopback_only
        super().__init__(host, port, local_hostname=local_hostname, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = connect_vetted(host, port, timeout, loopback_only=self._loopback_only)
        if self._implicit_tls is None:
            return sock
        try:
            return self._implicit_tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise


def _default_local_hostname() -> str:
    name = socket.gethostname()
    return name if "." in name else "localhost"


class SmtpSession:
    """One authenticated connection to one integration's server, reused for many messages."""

    def __init__(
        self,
        endpoint: SmtpEndpoint,
        *,
        username: str,
        auth: Authenticator,
        ssl_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.username = username
        self.auth = auth
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.local_hostname = local_hostname or _default_local_hostname()
        self.connections_opened = 0
        self.auth_count = 0
        self._client: _Client | None = None
        self._used = False  # the open connection carried a transaction: RSET before the next

    def __repr__(self) -> str:
        endpoint = self.endpoint
        return f"SmtpSession({endpoint.host}:{endpoint.port}, {endpoint.security}, {self.username!r})"

    def __enter__(self) -> SmtpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._client is not None and self._client.sock is not None

    @property
    def extensions(self) -> dict[str, str]:
        """The EHLO keywords of the open connection (after TLS), lower-case."""
        return dict(self._client.esmtp_features) if self._client is not None else {}

    # --- connection -------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, EHLO, STARTTLS (or implicit TLS), EHLO, AUTH."""
        try:
            self._open([])
        except SmtpFailure as exc:
            raise exc.bind({"mailbox": self.username}) from exc.__cause__

    def _open(self, steps: list[CheckStep]) -> None:
        self.close()
        try:
            client = self._connect(steps)
            self._client = client
            self._used = False
            self._secure(client, steps)
            self._ehlo(client, steps)
            self._authenticate(client)
            steps.append(
                CheckStep("auth", True, f"AUTH {self.auth.mechanisms[0]} accepted for {self.username}")
            )
        except BaseException:
            self._drop()
            raise

    def _connect(self, steps: list[CheckStep]) -> _Client:
        endpoint = self.endpoint
        implicit = self.ssl_context if endpoint.security == "tls" else None
        self.connections_opened += 1
        try:
            client = _Client(
                endpoint.host,
                endpoint.port,
                local_hostname=self.local_hostname,
                timeout=endpoint.timeout_seconds,
                implicit_tls=implicit,
                loopback_only=endpoint.security == "none",
            )
        except AddressNotAllowed as exc:
            raise SmtpFailure(exc.message, code="address_not_allowed", stage="connect") from None
        except smtplib.SMTPConnectError as exc:
            raise classify_smtp_reply(SmtpReply.parse(exc.smtp_code, exc.smtp_error), "greeting") from exc
        except ssl.SSLError as exc:
            raise smtp_connection_failure("tls", exc) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise smtp_connection_failure("connect", exc) from exc
        steps.append(CheckStep("connect", True, f"connected to {endpoint.host}:{endpoint.port}"))
        return client

    def _secure(self, client: _Client, steps: list[CheckStep]) -> None:
        security = self.endpoint.security
        if security == "starttls":
            self._say_ehlo(client)
            if not client.has_extn("starttls"):
                raise SmtpFailure(
                    "starttls: the server does not offer STARTTLS; no credential was sent",
                    code="tls_failed",
                    stage="starttls",
                )
            try:
                client.starttls(context=self.ssl_context)
            except smtplib.SMTPResponseException as exc:
                reply = SmtpReply.parse(exc.smtp_code, exc.smtp_error)
                failure = classify_smtp_reply(reply, "starttls")
                if not failure.retryable:
                    failure = SmtpFailure(failure.message, code="tls_failed", reply=reply, stage="starttls")
                raise failure from None
            except ssl.SSLError as exc:
                raise smtp_connection_failure("starttls", exc) from exc
            except (smtplib.SMTPException, OSError) as exc:
                raise smtp_connection_failure("starttls", exc) from exc
        sock = client.sock
        if isinstance(sock, ssl.SSLSocket):
            cipher = sock.cipher()
            steps.append(
                CheckStep(
                    "tls", True, f"{sock.version()} {cipher[0] if cipher else ''}, certificate verified"
                )
            )
        else:
            steps.append(CheckStep("tls", True, "no TLS: security 'none' to a loopback host"))

    def _say_ehlo(self, client: _Client) -> None:
        try:
            code, text = client.ehlo()
        except (smtplib.SMTPException, OSError) as exc:
            raise smtp_connection_failure("ehlo", exc) from exc
        if code != 250:
            raise classify_smtp_reply(SmtpReply.parse(code, text), "ehlo")

    def _ehlo(self, client: _Client, steps: list[CheckStep]) -> None:
        self._say_ehlo(client)
        offered = client.esmtp_features.get("auth", "").upper().split()
        usable = [m for m in self.auth.mechanisms if m in offered]
        summary = ", ".join(
            f"{k.upper()} {v.strip()}".strip()
            for k, v in client.esmtp_features.items()
            if k in _REPORTED_EXTENSIONS
        )
        if not usable:
            raise SmtpFailure(
                f"ehlo: the server offers AUTH {' '.join(offered) or '(none)'}, "
                f"not {' or '.join(self.auth.mechanisms)}",
                code="smtp_auth_failed",
                stage="ehlo",
                hint="Check host, port and security: servers offer AUTH only after TLS, and XOAUTH2 "
                "needs a provider endpoint (smtp.office365.com:587, smtp.gmail.com:587 or :465).",
            )
        steps.append(CheckStep("ehlo", True, summary))

    def _authenticate(self, client: _Client) -> None:
        if not isinstance(client.sock, ssl.SSLSocket):
            peer = client.sock.getpeername()[0] if client.sock is not None else ""
            if not (
                self.endpoint.security == "none"
                and is_loopback_host(self.endpoint.host)
                and _is_loopback_ip(peer)
            ):
                raise SmtpFailure(
                    "auth: refusing to send a credential without TLS to a non-loopback peer",
                    code="address_not_allowed",
                    stage="auth",
                )
        try:
            self._auth_once(client, fresh=False)
        except AuthRejected as first:
            retry = self.auth.refreshable and first.reply.code == 535 and first.reply.enhanced != "5.7.139"
            if not retry:
                raise _auth_failure(first, refreshed=False) from None
            if peer_has_spoken(client):  # the server hung up after refusing: a new connection
                client.close()
                client = self._reconnect_for_auth()
            try:
                self._auth_once(client, fresh=True)
            except AuthRejected as second:
                raise _auth_failure(second, refreshed=True) from None

    def _reconnect_for_auth(self) -> _Client:
        client = self._connect([])
        self._client = client
        self._secure(client, [])
        self._ehlo(client, [])
        return client

    def _auth_once(self, client: _Client, *, fresh: bool) -> None:
        self.auth_count += 1
        try:
            self.auth.authenticate(client, self.username, fresh=fresh)
        except CredentialUnusable as exc:
            raise SmtpFailure(f"auth: {exc}", code="smtp_auth_failed", stage="auth") from None
        except (AuthRejected, MailbrokerError):
            raise
        except binascii.Error:
            raise SmtpFailure(
                "auth: the server's AUTH challenge is not base64", code="smtp_auth_failed", stage="auth"
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise smtp_connection_failure("auth", exc) from None

    def close(self) -> None:
        """QUIT (errors ignored) and close."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if client.sock is not None:
                client.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            client.close()

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- mail -------------------------------------------------------------------------------

    def send(self, mail_from: str, rcpts: list[str], data: bytes, *, smtputf8: bool = False) -> SendResult:
        """One mail transaction. Returns the server's final reply with the accepted and refused
        recipients, or raises a classified ``SmtpFailure`` (``recipient_rejected`` when every
        recipient was refused; ``delivery_uncertain`` when the connection dropped after the body)."""
        try:
            return self._send(mail_from, rcpts, data, smtputf8=smtputf8)
        except SmtpFailure as exc:
            raise exc.bind({"mailbox": self.username}) from exc.__cause__

    def _send(self, mail_from: str, rcpts: list[str], data: bytes, *, smtputf8: bool) -> SendResult:
        _check_envelope(mail_from, rcpts, smtputf8)
        data = _LINE_ENDINGS.sub(b"\r\n", data)
        if self.is_open and peer_has_spoken(self._client):  # type: ignore[arg-type]
            self._drop()  # the server closed (or announced closing) the idle connection
        if not self.is_open:
            self.open()
        reconnected = False
        while True:
            client = self._client
            assert client is not None
            tx = self._transaction(client, mail_from, rcpts, data, smtputf8)
            self._used = True
            try:
                outcome = run_transaction(
                    client,
                    tx,
                    pipelining=client.has_extn("pipelining"),
                    chunking=client.has_extn("chunking"),
                )
            except ConnectionLost as lost:
                self._drop()
                if lost.body_sent:
                    raise smtp_connection_failure(lost.stage, lost.cause, after_body=True) from None
                if tx.reset and lost.before_mail and not reconnected:
                    reconnected = True  # the server closed the connection between messages
                    self.open()
                    continue
                raise smtp_connection_failure(lost.stage, lost.cause) from None
            except SmtpFailure:
                if not self.is_open:
                    self._drop()
                raise
            return SendResult(
                reply=outcome.reply,
                accepted=outcome.accepted,
                refused=outcome.refused,
                round_trips=outcome.round_trips,
            )

    def _transaction(
        self, client: _Client, mail_from: str, rcpts: list[str], data: bytes, smtputf8: bool
    ) -> Transaction:
        params: list[str] = []
        if client.has_extn("size"):
            limit = _int(client.esmtp_features.get("size", ""))
            if limit and len(data) > limit:
                raise SmtpFailure(
                    f"mail: the message is {len(data)} octets; the server accepts at most {limit}",
                    code="message_too_large",
                    stage="mail",
                )
            params.append(f"SIZE={len(data)}")
        if smtputf8:
            if not client.has_extn("smtputf8"):
                raise SmtpFailure(
                    "mail: the message has a non-ASCII address and the server does not offer SMTPUTF8",
                    code="invalid_message",
                    stage="mail",
                    hint="Use ASCII addresses for this integration: its server cannot carry UTF-8 addresses.",
                )
            params.append("SMTPUTF8")
        if (smtputf8 or not data.isascii()) and client.has_extn("8bitmime"):
            params.append("BODY=8BITMIME")
        return Transaction(
            mail_from=mail_from,
            rcpts=list(rcpts),
            data=data,
            mail_params=params,
            reset=self._used,
            utf8=smtputf8,
        )

    # --- live check -------------------------------------------------------------------------

    def check(self) -> list[CheckStep]:
        """Connect, TLS, EHLO, AUTH, QUIT on a new connection, no mail sent: each step's outcome,
        stopping at the first failure."""
        steps: list[CheckStep] = []
        try:
            self._open(steps)
        except MailbrokerError as exc:
            if isinstance(exc, SmtpFailure):
                exc.bind({"mailbox": self.username})
            name = CHECK_STEPS[len(steps)] if len(steps) < len(CHECK_STEPS) else "auth"
            steps.append(CheckStep(name, False, exc.message, exc.code, exc.hint))
            return steps
        client = self._client
        self._client = None
        assert client is not None
        try:
            code, text = client.quit()
            steps.append(CheckStep("quit", True, str(SmtpReply.parse(code, text))))
        except (smtplib.SMTPException, OSError) as exc:
            failure = smtp_connection_failure("quit", exc)
            steps.append(CheckStep("quit", False, failure.message, failure.code, failure.hint))
        finally:
            client.close()
        return steps


_REPORTED_EXTENSIONS = (
    "auth",
    "pipelining",
    "chunking",
    "size",
    "smtputf8",
    "8bitmime",
    "enhancedstatuscodes",
)


def _int(text: str) -> int:
    try:
        return int(text.strip() or 0)
    except ValueError:
        return 0


def _check_envelope(mail_from: str, rcpts: list[str], smtputf8: bool) -> None:
    problems = []
    if not _ENVELOPE_ADDRESS.fullmatch(mail_from) or not (smtputf8 or mail_from.isascii()):
        problems.append({"field": "from", "problem": "not a valid envelope address"})
    if not rcpts:
        problems.append({"field": "to", "problem": "no recipient"})
    for index, rcpt in enumerate(rcpts):
        if not _ENVELOPE_ADDRESS.fullmatch(rcpt) or not (smtputf8 or rcpt.isascii()):
            problems.append({"field": f"rcpt[{index}]", "problem": "not a valid envelope address"})
    if problems:
        failure = SmtpFailure("mail: invalid envelope", code="invalid_message", stage="mail")
        failure.details = problems
        raise failure


def _auth_failure(rejected: AuthRejected, *, refreshed: bool) -> SmtpFailure:
    failure = classify_smtp_reply(rejected.reply, "auth")
    message = failure.message
    if rejected.diagnosis:
        said = ", ".join(f"{k}={v}" for k, v in sorted(rejected.diagnosis.items()))
        message += f" (provider diagnosis: {said})"
    if refreshed:
        message += " (refused again with a freshly issued token)"
    return SmtpFailure(
        message, code=failure.code, reply=rejected.reply, stage="auth", hint_template=failure.hint_template
    )
