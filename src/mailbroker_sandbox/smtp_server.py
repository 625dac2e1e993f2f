"""The sandbox SMTP server: a loopback stand-in for smtp.office365.com and smtp.gmail.com.

It speaks ESMTP the way those servers do where mailbroker cares: STARTTLS or implicit TLS with
the sandbox CA's certificate, SASL XOAUTH2 verified against the sandbox token endpoints, AUTH
PLAIN/LOGIN for basic integrations, PIPELINING, CHUNKING (BDAT), SIZE, 8BITMIME and SMTPUTF8
(CHUNKING by default, as Exchange Online and Postfix offer it, so ``make run`` and the tests take
the BDAT path; ``chunking=False`` for a server that offers only DATA). It
refuses with the providers' own replies (535 5.7.3, 535 5.7.139, 554 5.2.0 SendAsDenied, Gmail's
334 error challenge then 535-5.7.8), and a test can inject a fault at any stage of the dialogue.

Built on aiosmtpd: ``_SandboxSMTP`` subclasses its protocol, and ``SandboxSmtpServer`` runs it on
an asyncio loop in a thread of its own, as aiosmtpd's Controller does, bound to 127.0.0.1 on a
free port. Tokens and passwords never reach a log: aiosmtpd's records that echo what a client
sent are dropped, and this module logs identities and outcomes only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import json
import logging
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesHeaderParser
from typing import Any

import requests
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException

from mailbroker_sandbox.ca import SandboxCA

log = logging.getLogger(__name__)

VerifyToken = Callable[[str], "dict[str, Any] | None"]

MODES = ("starttls", "tls", "none")
STAGES = (
    "greeting",
    "ehlo",
    "starttls",
    "auth",
    "mail",
    "rcpt",
    "data",
    "eod",
    "disconnect_mid_data",
    "disconnect_after_eod",
    "slow",
)
# Stages where an injected fault is a reply; "slow" delays the answer at one of these.
REPLY_STAGES = ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "eod")
_DEFAULT_FAULTS: dict[str, tuple[int, str]] = {
    "greeting": (421, "4.3.2 Service not available, closing transmission channel"),
    "ehlo": (421, "4.3.2 Service not available, closing transmission channel"),
    "starttls": (454, "4.7.0 TLS not available due to temporary reason"),
    "auth": (454, "4.7.0 Temporary authentication failure"),
    "mail": (451, "4.3.0 Temporary server error. Please try again later"),
    "rcpt": (550, "5.1.1 User unknown"),
    "data": (451, "4.3.0 Temporary server error. Please try again later"),
    "eod": (451, "4.3.0 Temporary server error. Please try again later"),
}

AUTH_SUCCESS = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.3 Authentication unsuccessful"
AUTH_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox."
)
SECURITY_DEFAULTS = (
    "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults "
    "policy. Contact your administrator."
)
SEND_AS_DENIED = (
    "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
    "Failed to process message due to a permanent exception"
)
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
NOT_AUTHENTICATED = "530 5.7.57 Client not authenticated to send mail"
GMAIL_ERROR_CHALLENGE = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
OUTLOOK_AUDIENCES = frozenset({"https://outlook.office.com", "https://outlook.office365.com"})
SEND_AS_APP_ROLE = "SMTP.SendAsApp"
GOOGLE_MAIL_SCOPE = "https://mail.google.com/"

# RFC 4954 §4: an AUTH command line (with a whole bearer token in it) may reach 12288 octets.
_AUTH_LINE_LIMIT = 12288
# RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF (after dot-unstuffing).
_TEXT_LINE_LIMIT = 1000
_BDAT = re.compile(r"(\d{1,12})(?:\s+(LAST))?", re.IGNORECASE)
_RCPT_ADDRESS = re.compile(r"TO:\s*<?([^<>\s]*)>?", re.IGNORECASE)
_SIZE_PARAM = re.compile(r"SIZE=(\d+)", re.IGNORECASE)


@dataclass
class AcceptedMessage:
    """One message the server accepted (answered 250 to, or stored before a faulted hang-up)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # exactly as received, after dot-unstuffing (DATA) or joined chunks (BDAT)
    auth_user: str
    session_id: str
    mechanism: str
    queue_id: str = ""
    mail_options: list[str] = field(default_factory=list)
    # time.perf_counter() when the server took the message, just before it answered 250
    accepted_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class _Mailbox:
    email: str
    password: str | None = field(repr=False)
    allowed_clients: frozenset[str] | None
    smtp_auth_disabled: bool
    send_as: frozenset[str]  # casefolded, itself included
    service_principals: frozenset[str] | None = None  # Object IDs Exchange knows with mailbox rights
    security_defaults: bool = False  # the tenant's security defaults block password sign-in


@dataclass
class _Fault:
    stage: str
    code: int
    text: str  # the reply text; for "slow", the stage to slow down
    times: int
    recipient: str | None
    delay: float


class SandboxSmtpServer:
    """An ESMTP server on 127.0.0.1 that verifies what mailbroker sends the way the providers do.

    ``verify_token`` maps a bearer token to its RFC 7662 introspection claims, or None when the
    token is unknown (``HttpIntrospector`` or ``TokenServer.introspect``). Without it, every
    XOAUTH2 attempt is refused.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        ca: SandboxCA,
        *,
        verify_token: VerifyToken | None = None,
        mode: str = "starttls",
        pipelining: bool = True,
        chunking: bool = True,
        smtputf8: bool = True,
        size_limit: int = 35 * 1024 * 1024,
        gmail_style: bool = False,
        trusted_cert: bool = True,
        hostname: str = "sandbox.smtp.local",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if size_limit < 1:
            raise ValueError("size_limit must be positive")
        self.ca = ca
        self.verify_token = verify_token
        self.mode = mode
        self.pipelining = pipelining
        self.chunking = chunking
        self.smtputf8 = smtputf8
        self.size_limit = size_limit
        self.gmail_style = gmail_style
        self.trusted_cert = trusted_cert
        self.hostname = hostname
        self.port = 0

        self.accepted: list[AcceptedMessage] = []
        self.connections = 0
        self.auth_successes = 0
        self.auth_attempts = 0
        self.max_concurrent: dict[str, int] = {}
        self._current: dict[str, int] = collections.defaultdict(int)
        self._mailboxes: dict[str, _Mailbox] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._sessions: set[_SandboxSMTP] = set()
        self._startup_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"SandboxSmtpServer(mode={self.mode!r}, address={self.host}:{self.port})"

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> SandboxSmtpServer:
        if self._thread is not None:
            raise RuntimeError("the sandbox SMTP server is already running")
        _hide_client_input()
        self._tls_context = self.ca.server_context(trusted=self.trusted_cert) if self.mode != "none" else None
        self._startup_error = None
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._serve, args=(loop, ready), name="sandbox-smtp", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("the sandbox SMTP server did not start within 10 s")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        log.debug("sandbox SMTP server listening on %s:%d (%s)", self.host, self.port, self.mode)
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(self._shut_down)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> SandboxSmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        implicit_tls = self._tls_context if self.mode == "tls" else None
        try:
            self._server = loop.run_until_complete(
                loop.create_server(self._new_session, self.host, 0, ssl=implicit_tls)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except Exception as exc:
            self._startup_error = exc
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            with contextlib.suppress(TimeoutError):
                loop.run_until_complete(asyncio.wait_for(self._server.wait_closed(), 2))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def _shut_down(self) -> None:
        assert self._server is not None and self._loop is not None
        self._server.close()
        for session in list(self._sessions):
            session.abort()
        self._loop.stop()

    def _new_session(self) -> _SandboxSMTP:
        assert self._loop is not None
        starttls = self._tls_context if self.mode == "starttls" else None
        return _SandboxSMTP(self, tls_context=starttls, loop=self._loop)

    # --- mailboxes -------------------------------------------------------------------------------

    def add_mailbox(
        self,
        email: str,
        *,
        password: str | None = None,
        allowed_clients: Iterable[str] | None = None,
        smtp_auth_disabled: bool = False,
        send_as: Iterable[str] | None = None,
        service_principals: Iterable[str] | None = None,
        security_defaults: bool = False,
    ) -> None:
        """Create (or replace) a mailbox. ``password`` enables AUTH PLAIN/LOGIN for it;
        ``allowed_clients`` are the OAuth client ids whose app-only tokens may use it (None: any);
        ``send_as`` are the other addresses it may send as. ``service_principals``: the Object IDs
        registered with New-ServicePrincipal and given mailbox permission — a Microsoft app-only
        token whose ``oid`` is not among them gets 535 5.7.3, as Exchange answers (None: any).
        ``security_defaults``: the tenant's security defaults refuse password sign-in (535 5.7.139)."""
        key = email.casefold()
        self._mailboxes[key] = _Mailbox(
            email=email,
            password=password,
            allowed_clients=None if allowed_clients is None else frozenset(allowed_clients),
            smtp_auth_disabled=smtp_auth_disabled,
            send_as=frozenset(a.casefold() for a in (send_as or ())) | {key},
            service_principals=None if service_principals is None else frozenset(service_principals),
            security_defaults=security_defaults,
        )

    def _find_mailbox(self, email: str) -> _Mailbox | None:
        return self._mailboxes.get(email.casefold())

    # --- faults ----------------------------------------------------------------------------------

    def drop_idle_connections(self, *, announce: bool = True) -> int:
        """Close every open connection with ``421 4.4.2``, as a server's idle timeout does
        between a client's transactions (``announce=False``: reset without a word, as a server
        restart or a middlebox's timeout looks to the client); returns how many were closed."""
        loop = self._loop
        if loop is None:
            return 0

        async def drop() -> int:
            sessions = list(self._sessions)
            for session in sessions:
                if not announce:
                    session.release()
                    session.abort()
                    continue
                with contextlib.suppress(Exception):
                    await session.push("421 4.4.2 sandbox.smtp.local idle timeout, closing connection")
                session._hang_up()
            return len(sessions)

        return asyncio.run_coroutine_threadsafe(drop(), loop).result(10)

    def fail(
        self,
        stage: str,
        code: int | None = None,
        text: str = "",
        *,
        times: int = 1,
        recipient: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Inject a fault the next ``times`` times the dialogue reaches ``stage``.

        Reply stages (``REPLY_STAGES``) answer ``code text`` instead of the normal reply (a
        ``\\n`` in ``text`` makes a multi-line reply); a 421, or any greeting fault, then closes
        the connection. ``rcpt`` may name one ``recipient``. ``disconnect_mid_data`` closes the
        connection once the body starts to arrive; ``disconnect_after_eod`` stores the message
        as accepted and closes without replying; ``slow`` waits ``delay`` seconds before
        answering at the stage named by ``text``.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if times < 1:
            raise ValueError("times must be at least 1")
        if recipient is not None and stage != "rcpt":
            raise ValueError("recipient applies to the rcpt stage only")
        if stage == "slow":
            if text not in REPLY_STAGES or delay <= 0:
                raise ValueError(f"slow needs text=<one of {', '.join(REPLY_STAGES)}> and delay > 0")
            code = 0
        elif stage in REPLY_STAGES:
            default_code, default_text = _DEFAULT_FAULTS[stage]
            if code is None:
                code, text = default_code, text or default_text
            elif not 400 <= code <= 599:
                raise ValueError("a fault reply code must be 4xx or 5xx")
            text = text or f"{code // 100}.0.0 Fault injected at {stage}"
        else:
            code = 0
        with self._lock:
            self._faults.append(_Fault(stage, code, text, times, recipient, delay))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget accepted messages, counters and faults (mailboxes stay)."""
        with self._lock:
            self.accepted.clear()
            self.connections = 0
            self.auth_successes = 0
            self.auth_attempts = 0
            self.max_concurrent.clear()
            self.max_concurrent.update({user: n for user, n in self._current.items() if n})
            self._faults.clear()

    def _take(self, stage: str, recipient: str | None = None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.stage != stage:
                    continue
                if fault.recipient is not None and (
                    recipient is None or fault.recipient.casefold() != recipient.casefold()
                ):
                    continue
                return self._consume(fault)
        return None

    def _take_delay(self, stage: str) -> float:
        with self._lock:
            for fault in self._faults:
                if fault.stage == "slow" and fault.text == stage:
                    return self._consume(fault).delay
        return 0.0

    def _consume(self, fault: _Fault) -> _Fault:
        fault.times -= 1
        if fault.times <= 0:
            self._faults.remove(fault)
        return fault

    # --- bookkeeping (called on the server's loop) -----------------------------------------------

    def _attempted(self) -> None:
        with self._lock:
            self.auth_attempts += 1

    def _opened(self, session: _SandboxSMTP) -> None:
        with self._lock:
            self.connections += 1
            self._sessions.add(session)

    def _closed(self, session: _SandboxSMTP) -> None:
        with self._lock:
            self._sessions.discard(session)

    def _authenticated(self, user: str) -> None:
        with self._lock:
            self.auth_successes += 1
            self._current[user] += 1
            self.max_concurrent[user] = max(self.max_concurrent.get(user, 0), self._current[user])

    def _ended(self, user: str) -> None:
        with self._lock:
            self._current[user] = max(0, self._current[user] - 1)

    def _accept(self, session: _SandboxSMTP, envelope: Envelope, data: bytes) -> AcceptedMessage:
        message = AcceptedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            auth_user=session.auth_user or "",
            session_id=session.session_id,
            mechanism=session.mechanism or "",
            queue_id=f"{uuid.uuid4().hex}@{self.hostname}",
            mail_options=list(envelope.mail_options),
        )
        with self._lock:
            self.accepted.append(message)
        log.info(
            "accepted %s from %s for %d recipient(s), %d octets",
            message.queue_id,
            message.mail_from,
            len(message.rcpt_tos),
            len(data),
        )
        return message


class HttpIntrospector:
    """A ``verify_token`` callable: RFC 7662 introspection over HTTPS, trusting ``cafile``.

    Returns the claims when the endpoint says the token is active, else None (also when the
    endpoint cannot be reached: the SMTP server then refuses the token, as a provider would).
    """

    def __init__(self, url: str, cafile: str, *, timeout: float = 5.0) -> None:
        if not url.startswith("https://"):
            raise ValueError("the introspection URL must be https")
        self.url = url
        self.cafile = cafile
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"HttpIntrospector({self.url!r})"

    def __call__(self, token: str) -> dict[str, Any] | None:
        try:
            with requests.Session() as http:
                http.trust_env = False  # loopback: never through a proxy named in the environment
                response = http.post(
                    self.url,
                    data={"token": token},
                    headers={"Accept": "application/json"},
                    verify=self.cafile,
                    timeout=self.timeout,
                )
                response.raise_for_status()
                claims = response.json()
        except (requests.RequestException, ValueError) as exc:
            log.warning("token introspection at %s failed: %s", self.url, type(exc).__name__)
            return None
        if isinstance(claims, dict) and claims.get("active") is True:
            return claims
        return None


# --- the protocol ----------------------------------------------------------------------------------


class _Envelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: bytearray | None = None  # BDAT data so far; None until the first chunk


class _Hooks:
    """aiosmtpd handler hooks: replies with enhanced status codes, and SIZE on MAIL."""

    async def handle_MAIL(
        self, server: _SandboxSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        for option in options:
            size = _SIZE_PARAM.fullmatch(option)
            if size and int(size.group(1)) > server.sandbox.size_limit:
                return TOO_BIG
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: _SandboxSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient OK"

    async def handle_RSET(self, server: _SandboxSMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Resetting"

    async def handle_NOOP(self, server: _SandboxSMTP, session: Session, envelope: Envelope, arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: _SandboxSMTP, session: Session, envelope: Envelope) -> str:
        server.release()
        return "221 2.0.0 Service closing transmission channel"

    async def handle_exception(self, error: Exception) -> str:
        log.warning(
            "SMTP session failed: %s", type(error).__name__, exc_info=not isinstance(error, TLSSetupException)
        )
        return "451 4.3.0 Error: internal server error"


class _SandboxSMTP(SMTP):
    """One client session. aiosmtpd reads commands one line at a time from a buffered stream, so
    pipelined commands are answered in order as they are read; STARTTLS discards what was
    buffered before it (RFC 3207 §4.2)."""

    # The stream's line limit: an AUTH line carries a whole token. DATA lines are held to
    # RFC 5321's 1000 octets by _read_text.
    line_length_limit = _AUTH_LINE_LIMIT + 2

    def __init__(
        self,
        sandbox: SandboxSmtpServer,
        *,
        tls_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.sandbox = sandbox  # first: aiosmtpd's constructor reads every property
        super().__init__(
            _Hooks(),
            data_size_limit=None,  # SIZE is enforced here, with RFC 3463 codes
            enable_SMTPUTF8=sandbox.smtputf8,
            hostname=sandbox.hostname,
            ident="ESMTP mailbroker sandbox ready",
            tls_context=tls_context,
            timeout=60,
            loop=loop,
        )
        self.session_id = uuid.uuid4().hex[:16]
        self.auth_user: str | None = None
        self.mechanism: str | None = None
        self._counted = False
        # Per session (aiosmtpd's default is one dict shared by every instance).
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"AUTH": _AUTH_LINE_LIMIT, "MAIL": 1024, "RCPT": 1024}
        )

    # --- state -----------------------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is not None

    @property
    def offers_auth(self) -> bool:
        return self.encrypted or self.sandbox.mode == "none"

    # Methods, not properties: aiosmtpd's constructor reads every attribute of the instance.
    def _envelope(self) -> _Envelope:
        assert isinstance(self.envelope, _Envelope)
        return self.envelope

    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    def _create_envelope(self) -> _Envelope:
        return _Envelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and self.transport is None
        super().connection_made(transport)
        if first:
            self.sandbox._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.release()
        self.sandbox._closed(self)
        super().connection_lost(error)

    def release(self) -> None:
        """This session no longer counts as a concurrent authenticated session."""
        if self._counted and self.auth_user:
            self._counted = False
            self.sandbox._ended(self.auth_user)

    def abort(self) -> None:
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]

    def _hang_up(self) -> None:
        self.release()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.transport.close()

    async def _reply(self, code: int, lines: list[str]) -> None:
        last = len(lines) - 1
        await self.push(
            "\r\n".join(f"{code}{' ' if i == last else '-'}{line}" for i, line in enumerate(lines))
        )

    async def _faulted(self, stage: str, recipient: str | None = None) -> bool:
        """Apply the faults injected for ``stage``: True when one answered instead of the server."""
        delay = self.sandbox._take_delay(stage)
        if delay:
            await asyncio.sleep(delay)
        fault = self.sandbox._take(stage, recipient)
        if fault is None:
            return False
        log.info("session %s: fault at %s: %d", self.session_id, stage, fault.code)
        await self._reply(fault.code, fault.text.split("\n"))
        if fault.code == 421 or stage == "greeting":
            self._hang_up()
        return True

    # --- greeting, EHLO, STARTTLS ----------------------------------------------------------------

    async def _handle_client(self) -> None:
        if await self._faulted("greeting"):
            return
        await super()._handle_client()

    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._faulted("ehlo"):
            return
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        session = self._session()
        session.extended_smtp = True
        session.host_name = hostname
        sandbox = self.sandbox
        peer = session.peer[0] if isinstance(session.peer, tuple) else session.peer
        lines = [f"{self.hostname} Hello [{peer}]", f"SIZE {sandbox.size_limit}", "8BITMIME"]
        if sandbox.smtputf8:
            lines.append("SMTPUTF8")
        if sandbox.pipelining:
            lines.append("PIPELINING")
        if sandbox.chunking:
            lines.append("CHUNKING")
        lines.append("ENHANCEDSTATUSCODES")
        if sandbox.mode == "starttls" and not self.encrypted:
            lines.append("STARTTLS")
        if self.offers_auth:
            lines.append("AUTH XOAUTH2 PLAIN LOGIN")
        await self._reply(250, lines)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.encrypted:
            await self.push("503 5.5.1 TLS already active")
            return
        if self.sandbox.mode != "starttls":
            await self.push("454 4.7.0 TLS not available")
            return
        if await self._faulted("starttls"):
            return
        await super().smtp_STARTTLS(arg)

    # --- AUTH ------------------------------------------------------------------------------------

    def _auth_refusal(self) -> str:
        return NOT_AUTHENTICATED if self.offers_auth else STARTTLS_FIRST

    async def check_auth_needed(self, caller_method: str) -> bool:
        if self._session().authenticated:
            return False
        await self.push(self._auth_refusal())
        return True

    async def smtp_AUTH(self, arg: str) -> None:
        self.sandbox._attempted()
        session = self._session()
        if await self.check_helo_needed("EHLO"):
            return
        if not session.extended_smtp:
            await self.push("503 5.5.1 Send EHLO first")
            return
        if not self.offers_auth:
            await self.push(STARTTLS_FIRST)
            return
        if session.authenticated:
            await self.push("503 5.5.1 Already authenticated")
            return
        if await self._faulted("auth"):
            return
        words = (arg or "").split()
        if not 1 <= len(words) <= 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        methods = {"XOAUTH2": self._xoauth2, "PLAIN": self._plain, "LOGIN": self._login}
        if mechanism not in methods:
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        user = await methods[mechanism](initial)
        if user is None:
            return
        session.authenticated = True
        self.auth_user, self.mechanism, self._counted = user, mechanism, True
        self.sandbox._authenticated(user)
        log.info("session %s: %s authenticated with %s", self.session_id, user, mechanism)
        await self.push(AUTH_SUCCESS)

    async def _response(self, initial: str | None, challenge: str) -> bytes | None:
        """The client's SASL response: the initial response, or its answer to a 334 challenge."""
        if initial is None:
            blob = await self.challenge_auth(challenge)
            return None if blob is MISSING else blob  # challenge_auth answered a bad response
        if initial == "=":
            return b""
        try:
            return base64.b64decode(initial, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _xoauth2(self, initial: str | None) -> str | None:
        blob = await self._response(initial, "")
        if blob is None:
            return None
        fields: dict[str, str] = {}
        for part in blob.decode("utf-8", "replace").split("\x01"):
            key, _, value = part.partition("=")
            fields[key] = value
        user = fields.get("user", "")
        scheme, _, token = fields.get("auth", "").partition(" ")
        if not user or scheme.lower() != "bearer" or not token:
            await self.push("501 5.5.2 Malformed XOAUTH2 response")
            return None
        mailbox = self.sandbox._find_mailbox(user)
        reason: str | None
        if mailbox is None:
            reason = "no such mailbox"
        else:
            claims = await self._verify(token)
            reason = _token_refusal(claims, mailbox)
        if reason is None and mailbox is not None:
            if not mailbox.smtp_auth_disabled:
                return mailbox.email
            reason = "SMTP AUTH disabled"
        log.info("session %s: XOAUTH2 refused for %s: %s", self.session_id, user, reason)
        if reason == "SMTP AUTH disabled":
            await self.push(AUTH_DISABLED)
        elif self.sandbox.gmail_style:
            encoded = base64.b64encode(json.dumps(GMAIL_ERROR_CHALLENGE).encode()).decode()
            await self.push(f"334 {encoded}")
            await self._reader.readline()  # the client's empty response ends the exchange
            await self._gmail_refusal()
        else:
            await self.push(AUTH_FAILED)
        return None

    async def _verify(self, token: str) -> dict[str, Any] | None:
        verify = self.sandbox.verify_token
        if verify is None:
            return None
        try:
            return await self.loop.run_in_executor(None, verify, token)
        except Exception as exc:
            log.warning("session %s: token verification failed: %s", self.session_id, type(exc).__name__)
            return None

    async def _plain(self, initial: str | None) -> str | None:
        blob = await self._response(initial, "")
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Malformed PLAIN response")
            return None
        return await self._check_password("PLAIN", parts[1], parts[2])

    async def _login(self, initial: str | None) -> str | None:
        login = await self._response(initial, "Username:")
        if login is None:
            return None
        password = await self._response(None, "Password:")
        if password is None:
            return None
        return await self._check_password("LOGIN", login, password)

    async def _check_password(self, mechanism: str, login: bytes, password: bytes) -> str | None:
        user = login.decode("utf-8", "replace")
        mailbox = self.sandbox._find_mailbox(user)
        expected = mailbox.password if mailbox is not None else None
        if expected is None or not hmac.compare_digest(expected.encode(), password):
            log.info(
                "session %s: %s refused for %s: wrong user or password", self.session_id, mechanism, user
            )
            if self.sandbox.gmail_style:
                await self._gmail_refusal()
            else:
                await self.push(AUTH_FAILED)
            return None
        assert mailbox is not None
        if mailbox.smtp_auth_disabled:
            await self.push(AUTH_DISABLED)
            return None
        if mailbox.security_defaults:
            await self.push(SECURITY_DEFAULTS)
            return None
        return mailbox.email

    async def _gmail_refusal(self) -> None:
        await self._reply(
            535,
            [
                "5.7.8 Username and Password not accepted. For more information, go to",
                f"5.7.8  https://support.google.com/mail/?p=BadCredentials {self.session_id} - gsmtp",
            ],
        )

    # --- the transaction -------------------------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._faulted("mail"):
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        address = _RCPT_ADDRESS.match(arg or "")
        if await self._faulted("rcpt", address.group(1) if address else None):
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        envelope = self._envelope()
        if envelope.chunks is not None:
            await self.push("503 5.5.1 DATA may not follow BDAT")
            return
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if await self._faulted("data"):
            return
        await self.push("354 Start mail input; end with <CRLF>.<CRLF>")
        if self.sandbox._take("disconnect_mid_data"):
            await self._reader.read(1)
            self._hang_up()
            return
        data, problem = await self._read_text()
        if problem:
            self._set_post_data_state()
            await self.push(problem)
            return
        await self._end_of_data(data)

    async def _read_text(self) -> tuple[bytes, str | None]:
        """Read a DATA body up to the lone dot, unstuffing dots (RFC 5321 §4.5.2). Oversized
        messages and overlong lines are read to the end and refused as a whole."""
        data = bytearray()
        problem: str | None = None
        limit = self.sandbox.size_limit
        line_start, line_length = True, 0
        while True:
            try:
                piece = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                piece = await self._reader.readexactly(exc.consumed)
            if line_start:
                if piece == b".\r\n":
                    break
                if piece.startswith(b"."):
                    piece = piece[1:]
                line_length = 0
            line_length += len(piece)
            line_start = piece.endswith(b"\r\n")
            if problem is None and line_length > _TEXT_LINE_LIMIT:
                problem = "500 5.5.6 Line too long (RFC 5321 4.5.3.1.6)"
            elif problem is None and len(data) + len(piece) > limit:
                problem = TOO_BIG
            if problem is None:
                data += piece
            else:
                data.clear()
        return bytes(data), problem

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 CHUNKING: ``BDAT <size> [LAST]``, then exactly <size> octets. A chunk is read
        whole even when it is refused, so the dialogue stays in step."""
        if not self.sandbox.chunking:
            await self.push('500 5.5.1 Error: command "BDAT" not recognized')
            return
        match = _BDAT.fullmatch((arg or "").strip())
        if match is None:
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        size, last = int(match.group(1)), match.group(2) is not None
        envelope = self._envelope()
        if envelope.chunks is None and self.sandbox._take("disconnect_mid_data"):
            if size:
                await self._reader.read(1)
            self._hang_up()
            return
        refusal = self._bdat_refusal(envelope)
        received = len(envelope.chunks or b"")
        keep = refusal is None and received + size <= self.sandbox.size_limit
        chunk = await self._read_octets(size, keep=keep)
        if refusal is not None:
            await self.push(refusal)
            return
        if not keep:
            self._set_post_data_state()
            await self.push(TOO_BIG)
            return
        if envelope.chunks is None:
            envelope.chunks = bytearray()
        envelope.chunks += chunk
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        await self._end_of_data(bytes(envelope.chunks))

    def _bdat_refusal(self, envelope: _Envelope) -> str | None:
        """Why a BDAT chunk cannot be taken in this state of the dialogue, if it cannot."""
        session = self._session()
        if not session.host_name:
            return "503 5.5.1 Error: send EHLO first"
        if not session.authenticated:
            return self._auth_refusal()
        if not envelope.rcpt_tos:
            return "503 5.5.1 Error: need RCPT command"
        return None

    async def _read_octets(self, size: int, *, keep: bool) -> bytes:
        kept = bytearray()
        remaining = size
        while remaining:
            piece = await self._reader.readexactly(min(remaining, 64 * 1024))
            remaining -= len(piece)
            if keep:
                kept += piece
        return bytes(kept)

    async def _end_of_data(self, data: bytes) -> None:
        envelope = self._envelope()
        self._set_post_data_state()
        if await self._faulted("eod"):
            return
        if not self._may_send_as(envelope, data):
            log.info("session %s: %s may not send as %s", self.session_id, self.auth_user, envelope.mail_from)
            await self.push(SEND_AS_DENIED)
            return
        message = self.sandbox._accept(self, envelope, data)
        if self.sandbox._take("disconnect_after_eod"):
            self._hang_up()
            return
        await self.push(f"250 2.0.0 OK <{message.queue_id}>")

    def _may_send_as(self, envelope: Envelope, data: bytes) -> bool:
        mailbox = self.sandbox._find_mailbox(self.auth_user or "")
        if mailbox is None:
            return False
        senders = [envelope.mail_from or ""]
        headers = BytesHeaderParser(policy=policy.default).parsebytes(data)
        for header in headers.get_all("From", []):
            senders.extend(address.addr_spec for address in getattr(header, "addresses", ()))
        return all(sender.casefold() in mailbox.send_as for sender in senders)


# The server's reasons to refuse a bearer token, in the order it checks them, one return each.
def _token_refusal(claims: dict[str, Any] | None, mailbox: _Mailbox) -> str | None:  # noqa: C901
    """Why a bearer token may not authenticate as ``mailbox`` (None: it may)."""
    if not claims or claims.get("active") is not True:
        return "token unknown or inactive"
    expires = claims.get("exp")
    if expires is not None and float(expires) <= time.time():
        return "token expired"
    subject = claims.get("sub")
    if subject:
        if str(subject).casefold() != mailbox.email.casefold():
            return "token issued for another user"
    elif mailbox.allowed_clients is not None and claims.get("client_id") not in mailbox.allowed_clients:
        return "client has no permission on the mailbox"
    elif mailbox.service_principals is not None and claims.get("oid") not in mailbox.service_principals:
        return "no service principal with this Object ID has permission on the mailbox"
    provider = str(claims.get("provider") or "")
    if provider == "microsoft":
        if SEND_AS_APP_ROLE not in (claims.get("roles") or ()):
            return f"token lacks the {SEND_AS_APP_ROLE} role"
        audience = claims.get("aud")
        audiences = set(audience) if isinstance(audience, list) else {audience}
        if not audiences & OUTLOOK_AUDIENCES:
            return "token not issued for Exchange Online"
    elif provider == "microsoft_delegated":
        scopes = {s.rsplit("/", 1)[-1] for s in str(claims.get("scope") or "").split()}
        if "SMTP.Send" not in scopes:
            return "token lacks the SMTP.Send delegated permission"
        if claims.get("aud") not in OUTLOOK_AUDIENCES:
            return "token not issued for Exchange Online"
    elif provider.startswith("google") and GOOGLE_MAIL_SCOPE not in str(claims.get("scope") or "").split():
        return f"token lacks the {GOOGLE_MAIL_SCOPE} scope"
    return None


# --- logging ---------------------------------------------------------------------------------------


class _DropClientInput(logging.Filter):
    """aiosmtpd's ``mail.log`` echoes what clients send: command lines, SASL blobs, replies that
    quote an unknown command. It masks ``AUTH <mech> <response>`` itself, but a line a confused
    client sends after a refused AUTH may be a credential. Those records go; the rest stay."""

    _ECHOING = frozenset({"%r unrecognised: %s"})

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(arg, bytes | bytearray) for arg in args):
            return False
        return record.msg not in self._ECHOING


def _hide_client_input() -> None:
    mail_log = logging.getLogger("mail.log")
    if not any(isinstance(f, _DropClientInput) for f in mail_log.filters):
        mail_log.addFilter(_DropClientInput())
