"""What the Graph and Gmail API transports share: one keep-alive HTTPS connection per integration
per batch (a ``requests.Session``), the bearer token from the broker with one forced refresh on
401, the request count, and the classification of a connection that failed.

Why ``requests`` and not an SDK or google-auth's ``AuthorizedSession`` is in docs/decisions.md:
the token must come from the broker (its shared cache and single flight), and a send is one POST.

Nothing here logs or raises a token: errors carry the API's status, its error code and scrubbed
text only.
"""

from __future__ import annotations

import email.utils
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from mailbroker.errors import AddressNotAllowed, MailbrokerError
from mailbroker.errors import _scrub as scrub
from mailbroker.integrations import is_forbidden_address

# The longest a connection may take to open; the read timeout is the integration's timeout.
CONNECT_TIMEOUT = 10.0


class TokenSource(Protocol):
    """Gives the integration's access token; ``force_refresh`` after the API refused the last one."""

    def __call__(self, force_refresh: bool = False) -> str: ...


@dataclass(frozen=True)
class ApiSendResult:
    """A message the API took: its answer (the status record's ``reply``) and the recipients it
    was sent for (the API refuses a message as a whole, never one recipient)."""

    reply: str
    accepted: list[str]
    refused: dict[str, str] = field(default_factory=dict)
    requests: int = 1


@dataclass(frozen=True)
class ApiAnswer:
    """An HTTP error answer, reduced to what classification reads."""

    status: int
    body: dict[str, Any]
    retry_after: float | None
    text: str

    @classmethod
    def of(cls, response: requests.Response) -> ApiAnswer:
        try:
            body = response.json()
        except ValueError:
            body = {}
        return cls(
            status=response.status_code,
            body=body if isinstance(body, dict) else {},
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            text=scrub(response.text or response.reason or ""),
        )


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds from now."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def refuse_forbidden_host(url: str) -> None:
    """The API's host as the resolver sees it: one that resolves to a link-local or
    instance-metadata address gets no token."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return  # unresolvable: the request itself fails and is classified
    if any(is_forbidden_address(str(info[4][0])) for info in infos):
        raise AddressNotAllowed(f"{host} resolves to a link-local or instance-metadata address")


def connection_failure(exc: requests.RequestException, api: str) -> MailbrokerError:
    """A request that got no HTTP answer. Before the request left (no connection, TLS refused) it
    is safe to retry; once it may have reached the API, the mail may have been sent, so it is
    ``delivery_uncertain`` and never resent automatically."""
    import urllib3.exceptions

    if isinstance(exc, requests.exceptions.SSLError):
        return MailbrokerError(f"{api}: TLS failed ({type(exc).__name__})", code="tls_failed")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return MailbrokerError(f"{api}: no connection within {CONNECT_TIMEOUT:g} s", code="api_transient")
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(exc, requests.ConnectionError) and isinstance(
        reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
    ):
        return MailbrokerError(f"{api}: could not connect ({type(reason).__name__})", code="api_transient")
    return MailbrokerError(
        f"{api}: the connection failed after the request was sent, before the answer "
        f"({type(exc).__name__}); the API may have sent the message",
        code="delivery_uncertain",
    )


class ApiSession:
    """One integration's HTTP session to its mail API for a batch: ``open`` checks where the token
    may go and takes a token, ``send`` POSTs one MIME message, ``close`` ends the connection.

    The ``requests.Session`` keeps one connection alive across the batch's messages, as the SMTP
    session does. A 401 drops the token and retries once with a fresh one; a second 401 is
    ``api_auth_failed``.
    """

    api = "mail API"
    # The largest MIME message the API takes in one request (bytes).
    max_message_bytes = 35 * 1024 * 1024

    def __init__(
        self,
        integration: Any,
        tokens: TokenSource,
        *,
        timeout: float | None = None,
        http: requests.Session | None = None,
    ) -> None:
        self.integration = integration
        self.endpoint = integration.api_endpoint
        self._tokens = tokens
        self._timeout = timeout if timeout is not None else float(integration.smtp.timeout_seconds)
        self._http = http
        self._token: str | None = None
        self.requests = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.integration.id!r}, {self.endpoint!r})"

    def __enter__(self) -> ApiSession:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._http is not None and self._token is not None

    def open(self) -> None:
        refuse_forbidden_host(self.endpoint)
        if self._http is None:
            self._http = requests.Session()
        self._token = self._tokens(False)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self._http = None
        self._token = None

    def send(self, mail_from: str, rcpts: list[str], data: bytes, *, smtputf8: bool = False) -> ApiSendResult:
        """Send ``data`` (the MIME message, Bcc header included); the API reads the recipients
        from its headers, ``rcpts`` are what the result reports as accepted."""
        if len(data) > self.max_message_bytes:
            raise MailbrokerError(
                f"{self.api}: the message is {len(data)} bytes, over the {self.max_message_bytes} "
                "bytes one request takes",
                code="message_too_large",
            )
        if not self.is_open:
            self.open()
        before = self.requests
        response = self._post(data)
        if response.status_code == 401:
            self._token = self._tokens(True)
            response = self._post(data)
            if response.status_code == 401:
                answer = ApiAnswer.of(response)
                raise MailbrokerError(
                    f"{self.api}: 401 after a fresh token: {self.describe(answer)}", code="api_auth_failed"
                )
        if self.succeeded(response):
            return ApiSendResult(
                reply=self.reply(response), accepted=list(rcpts), requests=self.requests - before
            )
        raise self.classify(ApiAnswer.of(response))

    def _post(self, data: bytes) -> requests.Response:
        assert self._http is not None
        url, headers, body = self.request_for(data)
        headers["Authorization"] = f"Bearer {self._token}"
        self.requests += 1
        try:
            return self._http.post(
                url,
                data=body,
                headers=headers,
                timeout=(min(CONNECT_TIMEOUT, self._timeout), self._timeout),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise connection_failure(exc, self.api) from exc

    # --- what each API defines ------------------------------------------------------------------

    def request_for(self, data: bytes) -> tuple[str, dict[str, str], bytes]:
        """(URL, headers, body) of the send request."""
        raise NotImplementedError

    def succeeded(self, response: requests.Response) -> bool:
        raise NotImplementedError

    def reply(self, response: requests.Response) -> str:
        raise NotImplementedError

    def classify(self, answer: ApiAnswer) -> MailbrokerError:
        raise NotImplementedError

    def describe(self, answer: ApiAnswer) -> str:
        return f"HTTP {answer.status} {answer.text}".strip()


def json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")
