"""The ``graph`` transport: Microsoft Graph ``POST /v1.0/users/{username}/sendMail`` with the MIME
message, base64-encoded, as ``text/plain`` (Graph's MIME send). ``202 Accepted`` means sent.

Graph reads the recipients from To, Cc and Bcc and strips Bcc from what it delivers. One request
takes at most 4 MB, the base64 text included, so about 3 MB of MIME: a larger message fails as
``message_too_large`` before anything is sent (the draft-and-upload-session route would rebuild
the message from parts, and the bytes and Message-ID would no longer be ours).

Errors (``{"error": {"code", "message"}}``) are classified by status and Graph's error code:
403 ``ErrorAccessDenied`` is ``graph_access_denied`` (Mail.Send, admin consent, the application
access policy or RBAC for Applications), 404 ``ErrorInvalidUser`` / ``MailboxNotEnabledForRESTAPI``
``mailbox_not_found``, 413 / ``ErrorMessageSizeExceeded`` ``message_too_large``, 429
``throttled`` with its Retry-After, 5xx ``api_transient``.
"""

from __future__ import annotations

import base64
from urllib.parse import quote

import requests

from mailbroker.errors import MailbrokerError
from mailbroker.transports.http import ApiAnswer, ApiSession

# Graph's request size limit, and what it leaves for the MIME message once base64-encoded.
GRAPH_REQUEST_LIMIT = 4 * 1024 * 1024
# Without a Retry-After, a throttled mailbox is left alone this long.
DEFAULT_THROTTLE_SECONDS = 60.0

_SIZE_CODES = frozenset({"ErrorMessageSizeExceeded", "RequestEntityTooLarge", "ErrorRequestTooLarge"})
_RECIPIENT_CODES = frozenset({"ErrorInvalidRecipients", "ErrorInvalidRecipient"})
_MAILBOX_CODES = frozenset({"ErrorInvalidUser", "MailboxNotEnabledForRESTAPI", "ResourceNotFound"})
_SEND_AS_CODES = frozenset({"ErrorSendAsDenied"})


def graph_error_code(answer: ApiAnswer) -> str:
    error = answer.body.get("error")
    return str(error.get("code") or "") if isinstance(error, dict) else ""


def classify_graph_error(answer: ApiAnswer) -> MailbrokerError:
    """A Graph error answer (other than the 401 the session handles) as a classified error."""
    code = graph_error_code(answer)
    what = f"Graph sendMail answered {answer.status} {code}".rstrip()
    text = _message(answer)
    message = f"{what}: {text}" if text else what
    status = answer.status
    if 200 <= status < 300:
        return MailbrokerError(f"{message} (no sign of the message it sent)", code="delivery_uncertain")
    if status == 413 or code in _SIZE_CODES:
        return MailbrokerError(message, code="message_too_large")
    if status == 429 or code in {"ApplicationThrottled", "TooManyRequests"}:
        return MailbrokerError(
            message, code="throttled", retry_after=answer.retry_after or DEFAULT_THROTTLE_SECONDS
        )
    if status >= 500:
        return MailbrokerError(message, code="api_transient", retry_after=answer.retry_after)
    if code in _SEND_AS_CODES:
        return MailbrokerError(message, code="send_as_denied")
    if status == 403:
        return MailbrokerError(message, code="graph_access_denied")
    if status == 404 or code in _MAILBOX_CODES:
        return MailbrokerError(message, code="mailbox_not_found")
    if code in _RECIPIENT_CODES:
        return MailbrokerError(message, code="recipient_rejected")
    if status == 401:
        return MailbrokerError(message, code="api_auth_failed")
    return MailbrokerError(message, code="api_rejected_message")


def _message(answer: ApiAnswer) -> str:
    error = answer.body.get("error")
    if isinstance(error, dict) and error.get("message"):
        from mailbroker.errors import _scrub

        return _scrub(str(error["message"]))
    return "" if answer.body else answer.text


class GraphSession(ApiSession):
    api = "Graph sendMail"
    # base64 turns 3 bytes into 4: what fits in one request.
    max_message_bytes = GRAPH_REQUEST_LIMIT * 3 // 4

    def request_for(self, data: bytes) -> tuple[str, dict[str, str], bytes]:
        mailbox = quote(self.integration.username, safe="@")
        url = f"{self.endpoint}/v1.0/users/{mailbox}/sendMail"
        return url, {"Content-Type": "text/plain"}, base64.b64encode(data)

    def succeeded(self, response: requests.Response) -> bool:
        return response.status_code == 202

    def reply(self, response: requests.Response) -> str:
        request_id = response.headers.get("request-id")
        return f"202 Accepted request-id={request_id}" if request_id else "202 Accepted"

    def classify(self, answer: ApiAnswer) -> MailbrokerError:
        return classify_graph_error(answer)

    def describe(self, answer: ApiAnswer) -> str:
        return f"{graph_error_code(answer) or answer.status} {_message(answer)}".strip()
