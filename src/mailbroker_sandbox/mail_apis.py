"""Loopback stand-ins for the two HTTP mail APIs, over HTTPS with the sandbox CA:

* Microsoft Graph ``POST /v1.0/users/{user}/sendMail`` with a base64 MIME body (``text/plain``),
  answering ``202``;
* Gmail ``POST /upload/gmail/v1/users/{userId}/messages/send?uploadType=media``
  (``message/rfc822``) and ``POST /gmail/v1/users/{userId}/messages/send`` (JSON ``raw``),
  answering ``200 {"id", "threadId", "labelIds"}``.

Like the real APIs they take the recipients from To, Cc and Bcc and deliver a copy without the
Bcc header. They accept only bearer tokens the sandbox token endpoints issued for the right
audience and scope (verified with ``verify_token``, the token server's introspection): a Graph
token must have the audience ``https://graph.microsoft.com`` and the ``Mail.Send`` role (or
delegated scope), a Gmail token ``gmail.send`` or ``https://mail.google.com/``. A mailbox can carry
an application access policy (the app ids that may send as it) and send-as grants.

What they received is stored (``received``: the MIME bytes exactly as sent, the recipients, the
delivered copy); ``connections`` counts TLS handshakes and ``requests`` HTTP requests, for the
benchmark. ``fail_next`` injects each error the APIs answer, in their own shapes. Bodies and
tokens are never logged.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email
import json
import logging
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.policy import compat32
from email.utils import getaddresses
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from mailbroker_sandbox.ca import SandboxCA
from mailbroker_sandbox.https import LoopbackHTTPSServer, SandboxRequestHandler

_log = logging.getLogger(__name__)

GRAPH_AUDIENCE = "https://graph.microsoft.com"
GMAIL_SEND_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/gmail.send",
        "https://mail.google.com/",
        "https://www.googleapis.com/auth/gmail.compose",
        "https://www.googleapis.com/auth/gmail.modify",
    }
)
GRAPH_REQUEST_LIMIT = 4 * 1024 * 1024
GMAIL_MAX_MESSAGE = 35 * 1024 * 1024
_MAX_BODY = GMAIL_MAX_MESSAGE * 4 // 3 + 1024
_IDLE_TIMEOUT = 30.0
_GRAPH_SEND = re.compile(r"/v1\.0/users/(?P<user>[^/]+)/sendMail")
_GMAIL_UPLOAD = re.compile(r"/upload/gmail/v1/users/(?P<user>[^/]+)/messages/send")
_GMAIL_JSON = re.compile(r"/gmail/v1/users/(?P<user>[^/]+)/messages/send")

# Graph errors: kind -> (status, code, message).
GRAPH_FAULTS: dict[str, tuple[int, str, str]] = {
    "401": (401, "InvalidAuthenticationToken", "Access token has expired or is not yet valid."),
    "403": (403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."),
    "send_as": (
        403,
        "ErrorSendAsDenied",
        "The user account which was used to submit this request does "
        "not have the right to send mail on behalf of the specified sending account.",
    ),
    "404": (404, "ErrorInvalidUser", "The requested user is invalid."),
    "not_rest": (
        404,
        "MailboxNotEnabledForRESTAPI",
        "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
    ),
    "413": (413, "RequestEntityTooLarge", "The request entity is too large."),
    "size": (400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size."),
    "recipients": (400, "ErrorInvalidRecipients", "At least one recipient isn't valid."),
    "empty": (400, "ErrorMimeContentInvalid", "The MIME content is empty."),
    "429": (429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
    "500": (500, "ErrorInternalServerError", "An internal server error occurred."),
    "503": (503, "ServiceUnavailable", "Service unavailable."),
}
# Gmail errors: kind -> (status, reason, status name, message).
GMAIL_FAULTS: dict[str, tuple[int, str, str, str]] = {
    "401": (401, "authError", "UNAUTHENTICATED", "Invalid Credentials"),
    "insufficientPermissions": (
        403,
        "insufficientPermissions",
        "PERMISSION_DENIED",
        "Request had insufficient authentication scopes.",
    ),
    "accessNotConfigured": (
        403,
        "accessNotConfigured",
        "PERMISSION_DENIED",
        "Gmail API has not been used in project 000000000000 before or it is "
        "disabled. Enable it by visiting the API Library, then retry.",
    ),
    "dailyLimitExceeded": (403, "dailyLimitExceeded", "RESOURCE_EXHAUSTED", "Daily Limit Exceeded"),
    "userRateLimitExceeded": (
        429,
        "userRateLimitExceeded",
        "RESOURCE_EXHAUSTED",
        "User-rate limit exceeded.",
    ),
    "rateLimitExceeded": (403, "rateLimitExceeded", "RESOURCE_EXHAUSTED", "Rate Limit Exceeded"),
    "429": (429, "rateLimitExceeded", "RESOURCE_EXHAUSTED", "Too many concurrent requests for user."),
    "failedPrecondition": (400, "failedPrecondition", "FAILED_PRECONDITION", "Precondition check failed."),
    "invalidArgument": (400, "invalidArgument", "INVALID_ARGUMENT", "Invalid To header"),
    "404": (404, "notFound", "NOT_FOUND", "Requested entity was not found."),
    "500": (500, "backendError", "INTERNAL", "Backend Error"),
    "503": (503, "backendError", "UNAVAILABLE", "The service is currently unavailable."),
}
# Either API: read the request, then close the connection without an answer.
DROP = "drop"


@dataclass(frozen=True)
class ApiMessage:
    """One message an API took: the MIME bytes as received, who it went to, and the copy
    recipients get (without Bcc)."""

    api: str  # graph | gmail
    mailbox: str
    client_id: str
    data: bytes
    recipients: tuple[str, ...]
    delivered: bytes
    form: str  # base64 (Graph) | media | raw (Gmail)
    id: str


@dataclass
class _Mailbox:
    address: str
    graph_clients: frozenset[str] | None  # application access policy: None lets every app in
    send_as: frozenset[str]
    gmail_enabled: bool = True


@dataclass
class _Fault:
    api: str
    kind: str
    remaining: int
    retry_after: int | None


@dataclass
class _Reply:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


class _Refused(Exception):
    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def strip_bcc(data: bytes) -> bytes:
    """The message without its Bcc header (folded lines included), every other byte unchanged."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"bcc:")
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept) + sep + body


def header_recipients(data: bytes) -> tuple[str, ...]:
    """To, Cc and Bcc addresses of a MIME message, once each, in that order."""
    headers = email.message_from_bytes(data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n", policy=compat32)
    seen: list[str] = []
    for name in ("To", "Cc", "Bcc"):
        values = [str(v) for v in headers.get_all(name) or []]
        for _, address in getaddresses(values):
            if address and address.lower() not in {s.lower() for s in seen}:
                seen.append(address)
    return tuple(seen)


def _from_address(data: bytes) -> str:
    headers = email.message_from_bytes(data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n", policy=compat32)
    found = getaddresses([str(headers.get("From") or "")])
    return found[0][1].lower() if found else ""


class MailApiServer:
    """Graph's sendMail and Gmail's messages.send on one HTTPS port on 127.0.0.1.

    ``verify_token`` maps a bearer token to its introspection claims (``TokenServer.introspect``
    or ``HttpIntrospector``), or None for a token the sandbox never issued. ``base_url`` is both
    the ``graph_endpoint`` and the ``gmail_endpoint`` of the integrations that use it.
    """

    def __init__(self, ca: SandboxCA, *, verify_token: Callable[[str], dict[str, Any] | None]) -> None:
        self._verify = verify_token
        self._lock = threading.Lock()
        self._mailboxes: dict[str, _Mailbox] = {}
        self._faults: list[_Fault] = []
        self._stopping = threading.Event()
        self.received: list[ApiMessage] = []
        self.connections = 0
        self.requests = 0
        self.tokens_refused = 0
        self._httpd = _HTTPSServer(
            self, ca.server_context(), _Handler, socket_timeout=_IDLE_TIMEOUT, on_connected=self._connected
        )
        self.port = self._httpd.server_port
        self.base_url = f"https://127.0.0.1:{self.port}"

    # lifecycle

    def start(self) -> MailApiServer:
        self._httpd.serve_in_background(f"sandbox-mail-apis-{self.port}")
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.close()

    def __enter__(self) -> MailApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MailApiServer({self.base_url!r})"

    # configuration

    def add_mailbox(
        self,
        address: str,
        *,
        graph_clients: Iterable[str] | None = None,
        send_as: Iterable[str] = (),
        gmail_enabled: bool = True,
    ) -> None:
        """A mailbox the APIs know. ``graph_clients`` is its application access policy (the app
        ids Graph lets send as it; None: every app with Mail.Send); ``send_as`` other From
        addresses it may use; ``gmail_enabled=False`` answers Gmail's failedPrecondition."""
        with self._lock:
            self._mailboxes[address.lower()] = _Mailbox(
                address,
                None if graph_clients is None else frozenset(graph_clients),
                frozenset(a.lower() for a in send_as),
                gmail_enabled,
            )

    def fail_next(self, api: str, kind: str, *, times: int = 1, retry_after: int | None = None) -> None:
        """Answer the next ``times`` send requests of ``api`` (graph | gmail) with the error
        ``kind`` (a key of GRAPH_FAULTS or GMAIL_FAULTS, or "drop": no answer at all);
        ``retry_after`` adds a Retry-After header."""
        table: dict[str, Any] = GRAPH_FAULTS if api == "graph" else GMAIL_FAULTS
        if api not in ("graph", "gmail") or (kind not in table and kind != DROP):
            raise ValueError(f"unknown fault {api}/{kind}")
        with self._lock:
            self._faults.append(_Fault(api, kind, times, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.connections = 0
            self.requests = 0
            self.tokens_refused = 0

    def delivered_to(self, recipient: str) -> list[ApiMessage]:
        return [m for m in list(self.received) if recipient.lower() in {r.lower() for r in m.recipients}]

    # requests

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def handle(self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes) -> _Reply:
        with self._lock:
            self.requests += 1
        if method != "POST":
            return _Reply(405, {"error": {"code": "BadRequest", "message": "Method not allowed."}})
        try:
            if match := _GRAPH_SEND.fullmatch(path):
                return self._graph(unquote(match["user"]), headers, body)
            if match := _GMAIL_UPLOAD.fullmatch(path):
                if query.get("uploadType") != "media":
                    raise _Refused(_gmail_error("invalidArgument", "uploadType must be media"))
                return self._gmail(unquote(match["user"]), headers, body, "media")
            if match := _GMAIL_JSON.fullmatch(path):
                return self._gmail(unquote(match["user"]), headers, body, "raw")
        except _Refused as refused:
            return refused.reply
        return _Reply(404, {"error": {"code": "NotFound", "message": "Resource not found."}})

    def _fault(self, api: str) -> _Reply | None:
        with self._lock:
            for fault in self._faults:
                if fault.api == api:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    break
            else:
                return None
        if fault.kind == DROP:
            return _Reply(0, drop=True)
        reply = _graph_error(fault.kind) if api == "graph" else _gmail_error(fault.kind)
        if fault.retry_after is not None:
            reply.headers["Retry-After"] = str(fault.retry_after)
        return reply

    def _bearer(self, headers: Any, refuse: Callable[[str], _Reply]) -> dict[str, Any]:
        scheme, _, token = str(headers.get("Authorization") or "").partition(" ")
        claims = self._verify(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if not claims or claims.get("active") is False:
            with self._lock:
                self.tokens_refused += 1
            raise _Refused(refuse("token"))
        return claims

    # Graph

    def _graph_claims(self, headers: Any) -> dict[str, Any]:
        """A Graph token's claims: the Graph audience and Mail.Send (role, or delegated scope)."""
        claims = self._bearer(headers, lambda _: _graph_error("401"))
        if claims.get("aud") not in (GRAPH_AUDIENCE, f"{GRAPH_AUDIENCE}/"):
            with self._lock:
                self.tokens_refused += 1
            raise _Refused(_graph_error("401", "Access token validation failure. Invalid audience."))
        # A delegated token's scope as Graph reads it (``scp``): the permission names, without the
        # resource the client asked for them on (https://graph.microsoft.com/Mail.Send).
        scp = {scope.rsplit("/", 1)[-1] for scope in str(claims.get("scope") or "").split()}
        delegated = "Mail.Send" in scp and claims.get("sub")
        if "Mail.Send" not in (claims.get("roles") or []) and not delegated:
            raise _Refused(_graph_error("403"))
        return claims

    def _graph(self, user: str, headers: Any, body: bytes) -> _Reply:
        claims = self._graph_claims(headers)
        fault = self._fault("graph")
        if fault is not None:
            return fault
        mailbox = self._mailboxes.get(user.lower())
        if mailbox is None:
            raise _Refused(_graph_error("404", f"The requested user '{user}' is invalid."))
        client_id = str(claims.get("client_id") or "")
        if mailbox.graph_clients is not None and client_id not in mailbox.graph_clients:
            raise _Refused(
                _graph_error(
                    "403",
                    "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly "
                    "AccessPolicy settings.",
                )
            )
        if headers.get_content_type() != "text/plain":
            raise _Refused(_graph_error("recipients", "Only text/plain (MIME) sends are supported here."))
        if len(body) > GRAPH_REQUEST_LIMIT:
            raise _Refused(_graph_error("413"))
        if not body.strip():
            raise _Refused(_graph_error("empty"))
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise _Refused(_graph_error("recipients", "Invalid base64 string for MIME content.")) from None
        self._check_from(mailbox, data, lambda: _graph_error("send_as"))
        recipients = header_recipients(data)
        if not recipients:
            raise _Refused(_graph_error("recipients"))
        self._store("graph", mailbox.address, client_id, data, recipients, "base64")
        return _Reply(202, None, {"request-id": str(uuid.uuid4())})

    # Gmail

    def _gmail(self, user: str, headers: Any, body: bytes, form: str) -> _Reply:
        claims = self._bearer(headers, lambda _: _gmail_error("401"))
        if not str(claims.get("provider") or "google").startswith("google"):
            raise _Refused(_gmail_error("401"))
        if not set(str(claims.get("scope") or "").split()) & GMAIL_SEND_SCOPES:
            raise _Refused(_gmail_error("insufficientPermissions"))
        token_user = str(claims.get("sub") or "")
        if user != "me" and user.lower() != token_user.lower():
            raise _Refused(_gmail_error("403", "Delegation denied for the user."))
        fault = self._fault("gmail")
        if fault is not None:
            return fault
        mailbox = self._mailboxes.get(token_user.lower())
        if mailbox is None or not mailbox.gmail_enabled:
            raise _Refused(_gmail_error("failedPrecondition"))
        data = self._gmail_message(headers, body, form)
        recipients = header_recipients(data)
        if not recipients:
            raise _Refused(_gmail_error("invalidArgument", "Recipient address required"))
        message_id = secrets.token_hex(8)
        self._store(
            "gmail", mailbox.address, str(claims.get("client_id") or ""), data, recipients, form, message_id
        )
        return _Reply(200, {"id": message_id, "threadId": message_id, "labelIds": ["SENT"]})

    def _gmail_message(self, headers: Any, body: bytes, form: str) -> bytes:
        if form == "media":
            if headers.get_content_type() != "message/rfc822":
                raise _Refused(_gmail_error("invalidArgument", "Media type must be message/rfc822."))
            if len(body) > GMAIL_MAX_MESSAGE:
                raise _Refused(_gmail_error("413"))
            return body
        try:
            raw = json.loads(body)["raw"]
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise _Refused(_gmail_error("invalidArgument", "'raw' RFC822 payload message string")) from None

    def _check_from(self, mailbox: _Mailbox, data: bytes, refuse: Callable[[], _Reply]) -> None:
        sender = _from_address(data)
        if sender and sender != mailbox.address.lower() and sender not in mailbox.send_as:
            raise _Refused(refuse())

    def _store(
        self,
        api: str,
        mailbox: str,
        client_id: str,
        data: bytes,
        recipients: tuple[str, ...],
        form: str,
        message_id: str | None = None,
    ) -> None:
        message = ApiMessage(
            api, mailbox, client_id, data, recipients, strip_bcc(data), form, message_id or uuid.uuid4().hex
        )
        with self._lock:
            self.received.append(message)
        _log.debug("%s accepted a message for %s (%d recipients)", api, mailbox, len(recipients))


def _graph_error(kind: str, message: str | None = None) -> _Reply:
    status, code, text = GRAPH_FAULTS[kind]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    request_id = str(uuid.uuid4())
    body = {
        "error": {
            "code": code,
            "message": message or text,
            "innerError": {"date": now, "request-id": request_id, "client-request-id": request_id},
        }
    }
    return _Reply(status, body, {"request-id": request_id})


def _gmail_error(kind: str, message: str | None = None) -> _Reply:
    if kind == "403":
        status, reason, name, text = 403, "forbidden", "PERMISSION_DENIED", "Forbidden"
    elif kind == "413":
        status, reason, name, text = 413, "uploadTooLarge", "FAILED_PRECONDITION", "Request too large."
    else:
        status, reason, name, text = GMAIL_FAULTS[kind]
    text = message or text
    error: dict[str, Any] = {
        "code": status,
        "message": text,
        "errors": [{"message": text, "domain": "global", "reason": reason}],
        "status": name,
    }
    if kind == "insufficientPermissions":
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                "domain": "googleapis.com",
                "metadata": {"service": "gmail.googleapis.com"},
            }
        ]
    if kind == "accessNotConfigured":
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "SERVICE_DISABLED",
                "domain": "googleapis.com",
                "metadata": {"service": "gmail.googleapis.com"},
            }
        ]
    headers = {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'} if status == 401 else {}
    return _Reply(status, {"error": error}, headers)


class _Handler(SandboxRequestHandler):
    server: _HTTPSServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs
    server_version = "mailbroker-sandbox-apis/1"
    timeout = _IDLE_TIMEOUT

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self.close_connection = True
            self._write(_Reply(413, {"error": {"code": 413, "message": "Request too large."}}))
            return
        body = self.rfile.read(length)
        app = self.server.app
        try:
            reply = app.handle(method, parts.path, dict(parse_qsl(parts.query)), self.headers, body)
        except Exception:
            _log.exception("sandbox mail API failed on %s %s", method, parts.path)
            reply = _Reply(500, {"error": {"code": 500, "message": "Internal error."}})
        if reply.drop:
            self.close_connection = True
            return
        self._write(reply)

    def _write(self, reply: _Reply) -> None:
        body = b"" if reply.body is None else json.dumps(reply.body).encode("utf-8")
        self.send_response(reply.status)
        if reply.body is not None:
            self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _HTTPSServer(LoopbackHTTPSServer):
    app: MailApiServer
