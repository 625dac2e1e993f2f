"""The ``gmail_api`` transport: Gmail API ``users.messages.send`` for the authenticated user
(``me``: the refresh token's user, or the service account's ``subject``).

The MIME message goes as it is, ``Content-Type: message/rfc822``, to the media upload endpoint
(``/upload/gmail/v1/users/me/messages/send?uploadType=media``): one request, no base64 inflation,
up to Gmail's 35 MB. ``200 {"id", "threadId"}`` means sent. Gmail reads the recipients from To,
Cc and Bcc and keeps Bcc out of what recipients see.

Errors (``{"error": {"code", "message", "errors": [{"reason"}], "status", "details"}}``) are
classified by their reason: ``insufficientPermissions`` (the token's scope),
``accessNotConfigured`` (the API is off in the Cloud project), ``dailyLimitExceeded`` (quota,
retried later), ``userRateLimitExceeded`` / ``rateLimitExceeded`` / 429 (throttled),
``failedPrecondition`` (Gmail off for the user), ``invalidArgument`` (the message), 5xx
(transient).
"""

from __future__ import annotations

import requests

from mailbroker.errors import MailbrokerError
from mailbroker.errors import _scrub as scrub
from mailbroker.transports.http import ApiAnswer, ApiSession

GMAIL_MAX_MESSAGE = 35 * 1024 * 1024
# Without a Retry-After: a throttled user is left alone a minute, a used-up daily quota an hour.
DEFAULT_THROTTLE_SECONDS = 60.0
DEFAULT_QUOTA_SECONDS = 3600.0

_RATE = frozenset({"userRateLimitExceeded", "rateLimitExceeded", "RATE_LIMIT_EXCEEDED"})
_QUOTA = frozenset({"dailyLimitExceeded", "quotaExceeded"})
_SCOPE = frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"})
_DISABLED = frozenset({"accessNotConfigured", "SERVICE_DISABLED"})
_PRECONDITION = frozenset({"failedPrecondition", "FAILED_PRECONDITION"})
_INVALID = frozenset({"invalidArgument", "INVALID_ARGUMENT", "badRequest"})
# What is left once the reasons above did not match, by status.
_BY_STATUS = {
    413: "message_too_large",
    404: "mailbox_not_found",
    403: "api_access_denied",
    401: "api_auth_failed",
}


def gmail_reasons(answer: ApiAnswer) -> set[str]:
    """Every reason the answer gives: ``errors[].reason``, ``status`` and ``details[].reason``."""
    error = answer.body.get("error")
    if not isinstance(error, dict):
        return set()
    reasons = {str(e.get("reason")) for e in error.get("errors") or [] if isinstance(e, dict)}
    reasons |= {str(d.get("reason")) for d in error.get("details") or [] if isinstance(d, dict)}
    if error.get("status"):
        reasons.add(str(error["status"]))
    return reasons - {"None", ""}


def classify_gmail_error(answer: ApiAnswer) -> MailbrokerError:
    """A Gmail API error answer (other than the 401 the session handles) as a classified error."""
    reasons = gmail_reasons(answer)
    message = _message(answer, reasons)
    status = answer.status
    if 200 <= status < 300:
        return MailbrokerError(f"{message} (no sign of the message it sent)", code="delivery_uncertain")
    if reasons & _QUOTA:
        return MailbrokerError(
            message, code="gmail_quota_exceeded", retry_after=answer.retry_after or DEFAULT_QUOTA_SECONDS
        )
    if status == 429 or reasons & _RATE:
        return MailbrokerError(
            message, code="throttled", retry_after=answer.retry_after or DEFAULT_THROTTLE_SECONDS
        )
    if status >= 500:
        return MailbrokerError(message, code="api_transient", retry_after=answer.retry_after)
    if reasons & _SCOPE:
        return MailbrokerError(message, code="gmail_insufficient_scope")
    if reasons & _DISABLED:
        return MailbrokerError(message, code="gmail_api_disabled")
    if reasons & _PRECONDITION:
        return MailbrokerError(message, code="gmail_not_enabled")
    return MailbrokerError(message, code=_BY_STATUS.get(status, "api_rejected_message"))


def _message(answer: ApiAnswer, reasons: set[str]) -> str:
    error = answer.body.get("error")
    text = scrub(str(error.get("message") or "")) if isinstance(error, dict) else answer.text
    named = ", ".join(sorted(r for r in reasons if not r.isupper())) or ", ".join(sorted(reasons))
    head = f"Gmail API answered {answer.status}" + (f" {named}" if named else "")
    return f"{head}: {text}" if text else head


class GmailApiSession(ApiSession):
    api = "Gmail API"
    max_message_bytes = GMAIL_MAX_MESSAGE

    def request_for(self, data: bytes) -> tuple[str, dict[str, str], bytes]:
        url = f"{self.endpoint}/upload/gmail/v1/users/me/messages/send?uploadType=media"
        return url, {"Content-Type": "message/rfc822"}, data

    def succeeded(self, response: requests.Response) -> bool:
        if response.status_code != 200:
            return False
        try:
            body = response.json()
        except ValueError:
            return False
        return isinstance(body, dict) and bool(body.get("id"))

    def reply(self, response: requests.Response) -> str:
        body = response.json()
        return f"200 id={body['id']} threadId={body.get('threadId', '')}".rstrip()

    def classify(self, answer: ApiAnswer) -> MailbrokerError:
        return classify_gmail_error(answer)

    def describe(self, answer: ApiAnswer) -> str:
        return _message(answer, gmail_reasons(answer))
