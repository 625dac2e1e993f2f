"""The HTTP transports' pure parts: the ``transport`` field validated per provider, the defaults it
brings, and the classification of Graph and Gmail API error answers."""

from __future__ import annotations

from typing import Any

import pytest
from mailbroker.errors import CATALOGUE, InvalidIntegration
from mailbroker.integrations import parse_integration
from mailbroker.transports.gmail_api import classify_gmail_error
from mailbroker.transports.graph import classify_graph_error
from mailbroker.transports.http import ApiAnswer, retry_after_seconds

MICROSOFT = {
    "id": "m365",
    "provider": "microsoft",
    "username": "support@contoso.com",
    "tenant_id": "contoso",
    "client_id": "app",
    "client_secret": "s3cret-value",
}
GOOGLE = {
    "id": "gmail",
    "provider": "google",
    "username": "ana@example.com",
    "client_id": "client",
    "client_secret": "s3cret-value",
    "refresh_token": "1//refresh",
}


def test_graph_transport_brings_the_graph_scope_an_smtp_default_and_exchange_limits() -> None:
    integration = parse_integration(MICROSOFT | {"transport": "graph"})

    assert integration.scope == "https://graph.microsoft.com/.default"
    assert integration.smtp.host == "smtp.office365.com"
    assert integration.api_endpoint == "https://graph.microsoft.com"
    limits = integration.effective_limits()
    assert (limits.max_connections, limits.messages_per_minute, limits.recipients_per_day) == (4, 30, 10_000)


def test_smtp_stays_the_default_transport_with_the_outlook_scope() -> None:
    integration = parse_integration(MICROSOFT | {"smtp": {"host": "smtp.office365.com"}})

    assert integration.transport == "smtp"
    assert integration.scope == "https://outlook.office365.com/.default"
    assert integration.effective_limits().max_connections == 3


def test_gmail_api_transport_has_workspace_daily_caps_and_the_gmail_endpoint() -> None:
    integration = parse_integration(GOOGLE | {"transport": "gmail_api"})

    assert integration.api_endpoint == "https://gmail.googleapis.com"
    assert integration.effective_limits().recipients_per_day == 10_000


@pytest.mark.parametrize(
    ("data", "field_problem"),
    [
        (GOOGLE | {"transport": "graph"}, "transport 'graph' is for providers microsoft"),
        (MICROSOFT | {"transport": "gmail_api"}, "transport 'gmail_api' is for providers google"),
        (
            MICROSOFT | {"transport": "graph", "scope": "https://outlook.office365.com/.default"},
            "needs a Microsoft Graph scope",
        ),
        (
            GOOGLE | {"transport": "gmail_api", "scope": "https://www.googleapis.com/auth/gmail.readonly"},
            "gmail.send",
        ),
        (MICROSOFT | {"transport": "graph", "graph_endpoint": "http://graph.example"}, "https URL"),
        (MICROSOFT | {"transport": "carrier-pigeon"}, "transport"),
    ],
)
def test_a_transport_that_does_not_fit_the_provider_is_refused_by_name(
    data: dict[str, Any], field_problem: str
) -> None:
    with pytest.raises(InvalidIntegration) as raised:
        parse_integration(data)

    assert field_problem in str(raised.value)
    assert "s3cret-value" not in str(raised.value)


def _answer(status: int, body: dict[str, Any], retry_after: float | None = None) -> ApiAnswer:
    return ApiAnswer(status=status, body=body, retry_after=retry_after, text="")


def _graph(status: int, code: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": f"{code} happened"}}


@pytest.mark.parametrize(
    ("status", "code", "expected", "retry_after"),
    [
        (403, "ErrorAccessDenied", "graph_access_denied", None),
        (403, "ErrorSendAsDenied", "send_as_denied", None),
        (404, "ErrorInvalidUser", "mailbox_not_found", None),
        (404, "MailboxNotEnabledForRESTAPI", "mailbox_not_found", None),
        (413, "RequestEntityTooLarge", "message_too_large", None),
        (400, "ErrorMessageSizeExceeded", "message_too_large", None),
        (400, "ErrorInvalidRecipients", "recipient_rejected", None),
        (400, "ErrorMimeContentInvalidBase64String", "api_rejected_message", None),
        (429, "ApplicationThrottled", "throttled", 60.0),
        (500, "ErrorInternalServerError", "api_transient", None),
        (503, "ServiceUnavailable", "api_transient", None),
    ],
)
def test_graph_errors_are_classified_by_status_and_graph_code(
    status: int, code: str, expected: str, retry_after: float | None
) -> None:
    error = classify_graph_error(_answer(status, _graph(status, code)))

    assert error.code == expected
    assert code in error.message
    assert error.retry_after == retry_after


def test_graph_429_keeps_the_retry_after_it_was_given() -> None:
    error = classify_graph_error(_answer(429, _graph(429, "TooManyRequests"), retry_after=240))

    assert (error.code, error.retryable, error.retry_after) == ("throttled", True, 240)


def _gmail(status: int, reason: str, name: str = "", detail: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": status,
        "message": f"{reason} happened",
        "errors": [{"domain": "global", "reason": reason, "message": f"{reason} happened"}],
    }
    if name:
        error["status"] = name
    if detail:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": detail}]
    return {"error": error}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            _answer(403, _gmail(403, "insufficientPermissions", "PERMISSION_DENIED")),
            "gmail_insufficient_scope",
        ),
        (
            _answer(403, _gmail(403, "forbidden", "PERMISSION_DENIED", "ACCESS_TOKEN_SCOPE_INSUFFICIENT")),
            "gmail_insufficient_scope",
        ),
        (
            _answer(403, _gmail(403, "accessNotConfigured", "PERMISSION_DENIED", "SERVICE_DISABLED")),
            "gmail_api_disabled",
        ),
        (_answer(403, _gmail(403, "dailyLimitExceeded", "RESOURCE_EXHAUSTED")), "gmail_quota_exceeded"),
        (_answer(429, _gmail(429, "userRateLimitExceeded", "RESOURCE_EXHAUSTED")), "throttled"),
        (_answer(403, _gmail(403, "rateLimitExceeded")), "throttled"),
        (_answer(429, {}), "throttled"),
        (_answer(400, _gmail(400, "failedPrecondition", "FAILED_PRECONDITION")), "gmail_not_enabled"),
        (_answer(400, _gmail(400, "invalidArgument", "INVALID_ARGUMENT")), "api_rejected_message"),
        (_answer(403, _gmail(403, "domainPolicy", "PERMISSION_DENIED")), "api_access_denied"),
        (_answer(404, _gmail(404, "notFound", "NOT_FOUND")), "mailbox_not_found"),
        (_answer(500, _gmail(500, "backendError")), "api_transient"),
        (_answer(502, {}), "api_transient"),
    ],
)
def test_gmail_errors_are_classified_by_reason(answer: ApiAnswer, expected: str) -> None:
    assert classify_gmail_error(answer).code == expected


def test_gmail_quota_and_rate_limits_are_retried_never_dead_lettered_at_once() -> None:
    quota = classify_gmail_error(_answer(403, _gmail(403, "dailyLimitExceeded")))
    rate = classify_gmail_error(_answer(429, _gmail(429, "userRateLimitExceeded"), retry_after=30))

    assert quota.retryable and quota.retry_after == 3600
    assert rate.retryable and rate.retry_after == 30


def test_every_code_the_transports_raise_is_in_the_catalogue() -> None:
    for code in (
        "api_auth_failed",
        "graph_access_denied",
        "mailbox_not_found",
        "api_access_denied",
        "gmail_insufficient_scope",
        "gmail_api_disabled",
        "gmail_not_enabled",
        "gmail_quota_exceeded",
        "api_rejected_message",
        "api_transient",
    ):
        assert CATALOGUE[code].hint


@pytest.mark.parametrize(("header", "seconds"), [("120", 120.0), (None, None), ("soon", None)])
def test_retry_after_is_read_as_seconds(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds
