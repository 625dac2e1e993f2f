"""Every failure mailbroker knows, classified once, here.

A failure has a stable ``code`` (a contract: see docs/design.md), a ``retryable`` flag, the HTTP
status the API answers with it, and a ``hint`` that tells an operator what to do. The HTTP API,
the direct invoke, status records and the README's troubleshooting table all read this catalogue.
Token endpoint answers and SMTP replies are mapped to codes by the two tables in this module
(``classify_token_error`` and ``classify_smtp_reply``); nothing else decides what a failure means.

Messages never carry a credential: callers pass descriptions, never tokens or secrets, and the
token classifier keeps only the provider's error code and description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ErrorKind:
    """One code of the catalogue: whether mailbroker retries it, the HTTP status the API answers
    with it, and the hint that names the fix."""

    code: str
    retryable: bool
    http_status: int
    hint: str

    def __post_init__(self) -> None:
        if not isinstance(self.http_status, int) or not 400 <= self.http_status < 600:
            raise TypeError(f"error kind {self.code!r} needs an HTTP error status, got {self.http_status!r}")


def _kinds(*kinds: ErrorKind) -> dict[str, ErrorKind]:
    return {k.code: k for k in kinds}


# A code's HTTP status is what the HTTP API answers when the error reaches it: 4xx for a request
# the caller must change, 502 for an upstream (token endpoint, SMTP server) that refused, 503 for
# what is worth retrying as it is.
CATALOGUE: dict[str, ErrorKind] = _kinds(
    ErrorKind(
        "invalid_request",
        False,
        400,
        "The request does not match the API's schema (or, for a direct invoke, "
        '{"integration": "<id>", "force_refresh": false}): fix the fields listed in \'details\'.',
    ),
    ErrorKind(
        "not_found",
        False,
        404,
        "Nothing is recorded at this route or id: check the route against the README's HTTP API "
        "table and the id. Message status records are kept for IDEMPOTENCY_HOURS after their last "
        "change; a health record appears after the keeper's first run.",
    ),
    ErrorKind(
        "invalid_message",
        False,
        400,
        "Fix the message JSON: every problem is listed in 'details'. It will not be retried.",
    ),
    ErrorKind(
        "invalid_integration",
        False,
        400,
        "The integration's secret does not match the schema for its provider: fix the named field "
        "with 'mailbroker integration add' (it validates before writing).",
    ),
    ErrorKind(
        "unknown_integration",
        False,
        404,
        "No secret named ${SECRET_PREFIX}<id> exists: register it with 'mailbroker integration add' "
        "or correct the integration id in the message.",
    ),
    ErrorKind(
        "sender_not_allowed",
        False,
        403,
        "The 'from' address must be listed in the integration's 'senders' (or be its 'username'), "
        "and the message 'usage' must be enabled in its 'usage' list.",
    ),
    ErrorKind(
        "token_invalid_grant",
        False,
        502,
        "The refresh token was rejected (expired or revoked). Google apps left in 'Testing' "
        "publishing status lose refresh tokens after 7 days; tokens also die after 6 months unused "
        "or on a password change. Re-consent: 'mailbroker consent google <id>'.",
    ),
    ErrorKind(
        "token_invalid_client",
        False,
        502,
        "The client id or secret was rejected (AADSTS7000215: secret value wrong — use the secret's "
        "Value, not its ID; AADSTS7000222: secret expired; unauthorized_client: the app may not use "
        "this grant). Create a new secret and update the integration.",
    ),
    ErrorKind(
        "token_unavailable",
        True,
        503,
        "The token endpoint did not answer usefully (5xx, 429 or timeout). Retried with back-off; "
        "if it persists, check the provider's status page and the endpoint URL.",
    ),
    ErrorKind(
        "token_scope_invalid",
        False,
        502,
        "The provider refused the requested scope: Microsoft needs "
        "'https://outlook.office365.com/.default' with the SMTP.SendAsApp application permission "
        "granted; Google needs 'https://mail.google.com/'.",
    ),
    ErrorKind(
        "smtp_auth_failed",
        False,
        502,
        "The server refused the token even after a fresh one. Microsoft 365: the Exchange service "
        "principal is missing or lacks mailbox permission — run 'mailbroker setup microsoft <id>' "
        "for the New-ServicePrincipal and Add-MailboxPermission commands (use the Enterprise "
        "Application's object id). Google: the token's user must be the mailbox.",
    ),
    ErrorKind(
        "smtp_auth_disabled",
        False,
        502,
        "SMTP AUTH is disabled for the tenant or mailbox (535 5.7.139), or security defaults block "
        "it: Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false.",
    ),
    ErrorKind(
        "send_as_denied",
        False,
        502,
        "The mailbox may not send as this 'from' address (SendAsDenied): grant it with "
        "Add-RecipientPermission <from> -AccessRights SendAs -Trustee <service principal>.",
    ),
    ErrorKind(
        "throttled",
        True,
        503,
        "The server asked to slow down (432 4.3.2, 421, 451 4.7.x, 454 4.7.0, 450 4.2.1). Retried "
        "with back-off; lower the integration's limits if it recurs (Microsoft 365: 30 msg/min, 3 "
        "connections per mailbox).",
    ),
    ErrorKind(
        "recipient_rejected",
        False,
        502,
        "The server refused this recipient (550/553 on RCPT): check the address; the other "
        "recipients were delivered.",
    ),
    ErrorKind(
        "message_too_large",
        False,
        502,
        "The message exceeds the server's SIZE limit (552 or the EHLO SIZE): send smaller "
        "attachments or a link instead.",
    ),
    ErrorKind(
        "smtp_transient",
        True,
        503,
        "A temporary SMTP failure (other 4xx, dropped connection or timeout). Retried with back-off.",
    ),
    ErrorKind(
        "smtp_permanent",
        False,
        502,
        "The server refused the message permanently (5xx): its reply is in 'message'.",
    ),
    ErrorKind(
        "tls_failed",
        False,
        502,
        "TLS could not be established or the certificate is not trusted. Certificates are always "
        "verified: install a private CA through SSL_CERT_FILE, and check host and 'security' "
        "(starttls on 587, tls on 465).",
    ),
    ErrorKind(
        "address_not_allowed",
        False,
        400,
        "The SMTP host or token URL resolves to a link-local or instance-metadata address, or "
        "'security: none' points off loopback: credentials are never sent there.",
    ),
    ErrorKind(
        "delivery_uncertain",
        False,
        502,
        "The connection was lost after the message body was sent but before the server's reply: "
        "the server may have accepted it. It is not resent automatically, to avoid a duplicate; "
        "check the recipient's mailbox, then re-drive it from the dead-letter queue if it is missing.",
    ),
    ErrorKind(
        "expired",
        False,
        500,
        "The message stayed undeliverable longer than the maximum retry age; the last error is "
        "attached. Re-drive it from the dead-letter queue once the cause is fixed.",
    ),
    ErrorKind(
        "caller_not_allowed",
        False,
        403,
        "This IAM principal may not fetch tokens over HTTP: add its role ARN to the stack's "
        "TokenApiPrincipals parameter, or call through a principal that is listed.",
    ),
    ErrorKind(
        "aws_unavailable",
        True,
        503,
        "An AWS dependency (DynamoDB, Secrets Manager, SQS, KMS) was throttled or unavailable. "
        "Retried with back-off.",
    ),
    ErrorKind(
        "internal_error",
        True,
        503,
        "An unexpected error; it was logged with its stack trace (without credentials).",
    ),
)


class MailbrokerError(Exception):
    """A classified failure. ``str()`` and ``to_dict()`` never contain a credential."""

    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in CATALOGUE:
            raise ValueError(f"unknown error code {self.code!r}")
        self.message = message
        self.details = details or []
        self.retry_after = retry_after
        self._hint = hint

    @property
    def kind(self) -> ErrorKind:
        return CATALOGUE[self.code]

    @property
    def retryable(self) -> bool:
        return self.kind.retryable

    @property
    def hint(self) -> str:
        return self._hint or self.kind.hint

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
        }
        if self.details:
            body["details"] = self.details
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


class InvalidRequest(MailbrokerError):
    """A request (HTTP body, path or direct-invoke event) that does not match the API's schema."""

    code = "invalid_request"


class NotFound(MailbrokerError):
    """Nothing at this route, or no record for this id."""

    code = "not_found"


class InvalidMessage(MailbrokerError):
    code = "invalid_message"


class InvalidIntegration(MailbrokerError):
    code = "invalid_integration"


class UnknownIntegration(MailbrokerError):
    code = "unknown_integration"


class SenderNotAllowed(MailbrokerError):
    code = "sender_not_allowed"


class TokenError(MailbrokerError):
    """A failure to obtain an access token; the code says which."""

    code = "token_unavailable"


class TokenUnavailable(TokenError):
    code = "token_unavailable"


class AddressNotAllowed(MailbrokerError):
    code = "address_not_allowed"


class AwsUnavailable(MailbrokerError):
    code = "aws_unavailable"


def aws_error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (else the exception's class name)."""
    return getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)


def aws_failure(exc: BaseException, what: str) -> AwsUnavailable:
    """An AWS call that failed, as ``aws_unavailable``: ``what`` names the call, the AWS error code
    follows. Nothing from the request or the response body is included."""
    return AwsUnavailable(f"{what} failed: {aws_error_code(exc)}")


@dataclass(frozen=True)
class SmtpReply:
    """One SMTP reply: the basic code, the RFC 3463 enhanced status code if any, and the text."""

    code: int
    text: str = ""
    enhanced: str | None = field(default=None)

    @classmethod
    def parse(cls, code: int, message: bytes | str) -> SmtpReply:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        match = _ENHANCED.match(text.strip())
        return cls(code=code, text=text.strip(), enhanced=match.group(1) if match else None)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


class SmtpFailure(MailbrokerError):
    """A classified SMTP failure, with the reply (if the server gave one) and the stage."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        reply: SmtpReply | None = None,
        stage: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, code=code, hint=hint)
        self.reply = reply
        self.stage = stage

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        if self.reply is not None:
            body["reply"] = str(self.reply)
        if self.stage:
            body["stage"] = self.stage
        return body


# --- token endpoint answers -------------------------------------------------------------------

# AADSTS codes that mean the client credential itself is wrong or expired.
_AAD_INVALID_CLIENT = {7000215, 7000222, 700016, 700027, 7000112}
_AAD_INVALID_SCOPE = {70011, 500011}


def classify_token_error(
    *,
    status: int | None = None,
    error: str | None = None,
    description: str | None = None,
    error_codes: list[int] | None = None,
    retry_after: float | None = None,
    provider: str = "",
) -> TokenError:
    """Map a token endpoint answer (RFC 6749 §5.2 error, HTTP status, or a transport failure
    given as ``status=None, error=None``) to a classified :class:`TokenError`."""
    codes = set(error_codes or [])
    desc = _scrub(description or "")
    what = f"{provider} token endpoint".strip()
    if error == "invalid_grant":
        return TokenError(f"{what} answered invalid_grant: {desc}".rstrip(": "), code="token_invalid_grant")
    if error in {"invalid_client", "unauthorized_client"} or codes & _AAD_INVALID_CLIENT:
        return TokenError(f"{what} answered {error}: {desc}".rstrip(": "), code="token_invalid_client")
    if error == "invalid_scope" or codes & _AAD_INVALID_SCOPE:
        return TokenError(f"{what} answered {error}: {desc}".rstrip(": "), code="token_scope_invalid")
    if status == 429 or error in {"temporarily_unavailable", "slow_down"}:
        return TokenUnavailable(
            f"{what} is throttling (HTTP {status or 429}); retry after {retry_after or 'a while'} s",
            retry_after=retry_after,
        )
    if status is None and error is None:
        return TokenUnavailable(f"{what} could not be reached: {desc}".rstrip(": "))
    if status is not None and status >= 500:
        return TokenUnavailable(f"{what} failed with HTTP {status}", retry_after=retry_after)
    if error:
        # An RFC 6749 error we do not know more about is a configuration problem, not transient.
        return TokenError(f"{what} answered {error}: {desc}".rstrip(": "), code="token_invalid_client")
    return TokenUnavailable(f"{what} answered HTTP {status} without a token", retry_after=retry_after)


_SECRETISH = re.compile(
    r"(?i)(eyJ[\w-]{10,}\.[\w-]+\.[\w-]*|ya29\.[\w.-]+|1//[\w-]{10,}|[A-Za-z0-9~_.-]{40,})"
)


def _scrub(text: str) -> str:
    """Drop anything token-shaped from provider prose before it enters a message."""
    return _SECRETISH.sub("[redacted]", text)[:300]


# --- SMTP replies --------------------------------------------------------------------------------

# (basic code or None, enhanced-code prefix or None, stage or None) -> error code. First match wins;
# the order runs from the most specific to the least. Matching uses codes, never reply prose.
_SMTP_TABLE: list[tuple[int | None, str | None, str | None, str]] = [
    (535, "5.7.139", None, "smtp_auth_disabled"),
    (535, "5.7.3", None, "smtp_auth_failed"),
    (535, None, None, "smtp_auth_failed"),
    (534, None, None, "smtp_auth_failed"),
    (530, "5.7.0", "auth", "smtp_auth_failed"),
    (554, "5.2.0", None, "send_as_denied"),
    (432, "4.3.2", None, "throttled"),
    (421, None, None, "throttled"),
    (451, "4.7.", None, "throttled"),
    (454, "4.7.0", None, "throttled"),
    (450, "4.2.1", None, "throttled"),
    (452, "4.5.3", "rcpt", "throttled"),
    (552, None, None, "message_too_large"),
    (None, "5.3.4", None, "message_too_large"),
    (550, None, "rcpt", "recipient_rejected"),
    (553, None, "rcpt", "recipient_rejected"),
    (551, None, "rcpt", "recipient_rejected"),
    (554, None, "rcpt", "recipient_rejected"),
]


def classify_smtp_reply(reply: SmtpReply, stage: str) -> SmtpFailure:
    """Classify an SMTP reply received at ``stage`` (greeting, ehlo, starttls, auth, mail, rcpt,
    data, body, quit) into an :class:`SmtpFailure`."""
    code = None
    enhanced = reply.enhanced or ""
    for basic, prefix, at_stage, error_code in _SMTP_TABLE:
        if basic is not None and basic != reply.code:
            continue
        if prefix is not None and not enhanced.startswith(prefix):
            continue
        if at_stage is not None and at_stage != stage:
            continue
        code = error_code
        break
    if code is None:
        code = "smtp_transient" if 400 <= reply.code < 500 else "smtp_permanent"
    return SmtpFailure(f"{stage}: {_scrub(str(reply))}", code=code, reply=reply, stage=stage)


def smtp_connection_failure(stage: str, exc: BaseException, *, after_body: bool = False) -> SmtpFailure:
    """Classify a socket-level failure (reset, timeout, TLS) at ``stage``."""
    import ssl

    if after_body:
        return SmtpFailure(
            f"{stage}: connection lost after the message body, before the server's reply "
            f"({type(exc).__name__})",
            code="delivery_uncertain",
            stage=stage,
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return SmtpFailure(
            f"{stage}: certificate not trusted: {exc.verify_message}", code="tls_failed", stage=stage
        )
    if isinstance(exc, ssl.SSLError):
        return SmtpFailure(
            f"{stage}: TLS failed: {exc.reason or type(exc).__name__}", code="tls_failed", stage=stage
        )
    return SmtpFailure(
        f"{stage}: {type(exc).__name__}: {_scrub(str(exc))}".rstrip(": "), code="smtp_transient", stage=stage
    )


def classify_exception(exc: BaseException) -> MailbrokerError:
    """Any exception as a classified error (unknown ones become ``internal_error``)."""
    if isinstance(exc, MailbrokerError):
        return exc
    return MailbrokerError(f"unexpected {type(exc).__name__}", code="internal_error")
