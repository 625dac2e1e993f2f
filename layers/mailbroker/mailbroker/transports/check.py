"""The live check of an HTTP transport, behind ``POST /v1/integrations/{id}/check``, the keeper's
live check and ``mailbroker doctor``. No mail is sent:

* Graph: the token's claims (``aud`` is Microsoft Graph, the ``Mail.Send`` role or delegated
  scope), then an empty ``sendMail`` request, which can never send: Graph authorises it
  (token, permission, application access policy, mailbox) and then refuses the empty body with
  400, or answers the 401, 403 or 404 a real send would get.
* Gmail API: the token's scope from Google's ``tokeninfo``, then an empty ``messages.send``
  request, refused with 400 invalidArgument when the API is enabled and Gmail is on for the
  user, or answered 403 accessNotConfigured / 400 failedPrecondition.

The common mistakes get their own explanation: ``SMTP.SendAsApp`` granted where Graph needs
``Mail.Send`` (and an Exchange token given to Graph), the Gmail API not enabled in the Cloud
project.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import requests

from mailbroker.errors import MailbrokerError
from mailbroker.integrations import DEFAULT_GOOGLE_TOKEN_URI
from mailbroker.smtp.transport import CheckStep
from mailbroker.transports.gmail_api import classify_gmail_error, gmail_reasons
from mailbroker.transports.graph import classify_graph_error, graph_error_code
from mailbroker.transports.http import ApiAnswer, connection_failure, refuse_forbidden_host

GRAPH_AUDIENCES = frozenset({"https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"})
EXCHANGE_AUDIENCES = frozenset(
    {"https://outlook.office.com", "https://outlook.office365.com", "00000002-0000-0ff1-ce00-000000000000"}
)
GMAIL_SEND_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/gmail.send",
        "https://mail.google.com/",
        "https://www.googleapis.com/auth/gmail.compose",
        "https://www.googleapis.com/auth/gmail.modify",
    }
)
MAIL_SEND = "Mail.Send"
SEND_AS_APP = "SMTP.SendAsApp"


def api_check(integration: Any, token: str, *, timeout: float = 10.0) -> list[CheckStep]:
    """The steps after the token, ending at the first failure."""
    if integration.transport == "graph":
        steps = graph_claims(integration, token)
    else:
        steps = [gmail_scope(integration, token, timeout)]
    if all(step.ok for step in steps):
        steps.append(probe(integration, token, timeout))
    return steps


# --- Graph --------------------------------------------------------------------------------------


def graph_claims(integration: Any, token: str) -> list[CheckStep]:
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return [_failed("audience", "the access token is not a JWT", "api_auth_failed")]
    audience = str(claims.get("aud", "")).rstrip("/")
    if audience in EXCHANGE_AUDIENCES:
        return [
            _failed(
                "audience",
                f"the token is for Exchange Online's SMTP ({audience}), not Microsoft Graph",
                "api_auth_failed",
                "An SMTP token does not open Graph: transport 'graph' asks for the scope "
                f"https://graph.microsoft.com/.default (the integration asks for {integration.scope}).",
            )
        ]
    if audience not in GRAPH_AUDIENCES:
        return [
            _failed(
                "audience", f"the token is for {audience or '(no audience)'}, not Graph", "api_auth_failed"
            )
        ]
    steps = [CheckStep("audience", True, f"aud {audience} (Microsoft Graph)")]
    roles = [str(role) for role in claims.get("roles") or []]
    delegated = str(claims.get("scp") or "").split()
    if MAIL_SEND in roles or MAIL_SEND in delegated:
        granted = "role" if MAIL_SEND in roles else "delegated scope"
        steps.append(CheckStep("role", True, f"{granted} {MAIL_SEND}"))
        return steps
    hint = (
        f"Add Microsoft Graph > Application permissions > {MAIL_SEND} to the app registration and "
        "grant admin consent; 'mailbroker setup microsoft <id> --transport graph' prints the steps."
    )
    if SEND_AS_APP in roles:
        hint = (
            f"The app has {SEND_AS_APP}, which is Exchange Online's permission for SMTP; Graph needs "
            f"its own {MAIL_SEND} application permission. {hint}"
        )
    steps.append(
        _failed(
            "role",
            f"the token has no {MAIL_SEND} role (roles: {', '.join(roles) or 'none'})",
            "graph_access_denied",
            hint,
        )
    )
    return steps


# --- Gmail --------------------------------------------------------------------------------------


def tokeninfo_url(integration: Any) -> str:
    """Google's tokeninfo endpoint, next to the integration's token endpoint."""
    token_uri = getattr(integration, "effective_token_uri", None) or getattr(
        integration, "token_uri", DEFAULT_GOOGLE_TOKEN_URI
    )
    return str(token_uri).rsplit("/", 1)[0] + "/tokeninfo"


def gmail_scope(integration: Any, token: str, timeout: float) -> CheckStep:
    url = tokeninfo_url(integration)
    try:
        refuse_forbidden_host(url)
        with requests.Session() as http:
            response = http.post(url, data={"access_token": token}, timeout=timeout)
        info = response.json() if response.status_code == 200 else {}
    except (requests.RequestException, ValueError, MailbrokerError) as exc:
        return _failed("scope", f"tokeninfo could not be read ({type(exc).__name__})", "api_transient")
    granted = set(str(info.get("scope") or "").split()) if isinstance(info, dict) else set()
    if not granted:
        return _failed(
            "scope", f"tokeninfo answered {response.status_code} without a scope", "api_auth_failed"
        )
    if granted & GMAIL_SEND_SCOPES:
        return CheckStep("scope", True, f"the token grants {' '.join(sorted(granted & GMAIL_SEND_SCOPES))}")
    return _failed(
        "scope",
        f"the token grants {' '.join(sorted(granted))}, not gmail.send",
        "gmail_insufficient_scope",
    )


# --- the empty request ----------------------------------------------------------------------------


def probe(integration: Any, token: str, timeout: float) -> CheckStep:
    """An empty send request: authorised and then refused for its empty body, nothing sent."""
    if integration.transport == "graph":
        url = f"{integration.api_endpoint}/v1.0/users/{quote(integration.username, safe='@')}/sendMail"
        headers, body = {"Content-Type": "text/plain"}, b""
    else:
        url = f"{integration.api_endpoint}/gmail/v1/users/me/messages/send"
        headers, body = {"Content-Type": "application/json"}, b"{}"
    try:
        refuse_forbidden_host(url)
        with requests.Session() as http:
            response = http.post(
                url,
                data=body,
                headers={**headers, "Authorization": f"Bearer {token}"},
                timeout=timeout,
                allow_redirects=False,
            )
    except MailbrokerError as exc:
        return _failed("api", exc.message, exc.code)
    except requests.RequestException as exc:
        error = connection_failure(exc, "the check")
        code = "api_transient" if error.code == "delivery_uncertain" else error.code
        return _failed("api", error.message, code)
    answer = ApiAnswer.of(response)
    if integration.transport == "graph":
        return _graph_probe(integration, answer)
    return _gmail_probe(integration, answer)


def _graph_probe(integration: Any, answer: ApiAnswer) -> CheckStep:
    if answer.status == 400:
        return CheckStep(
            "api",
            True,
            f"Graph authorised sendMail for {integration.username} (an empty request, refused with "
            f"400 {graph_error_code(answer)}; nothing sent)",
        )
    if answer.status == 401:
        return _failed("api", f"Graph refused the token: {answer.text}", "api_auth_failed")
    error = classify_graph_error(answer)
    return _failed("api", error.message, error.code)


def _gmail_probe(integration: Any, answer: ApiAnswer) -> CheckStep:
    reasons = gmail_reasons(answer)
    if answer.status == 400 and not reasons & {"failedPrecondition", "FAILED_PRECONDITION"}:
        return CheckStep(
            "api",
            True,
            f"the Gmail API is enabled and Gmail is on for {integration.username} (an empty request, "
            "refused with 400; nothing sent)",
        )
    if answer.status == 401:
        return _failed("api", "the Gmail API refused the token", "api_auth_failed")
    error = classify_gmail_error(answer)
    return _failed("api", error.message, error.code)


def _failed(name: str, detail: str, code: str, hint: str | None = None) -> CheckStep:
    from mailbroker.errors import CATALOGUE

    return CheckStep(name, False, detail, code, hint or CATALOGUE[code].hint)
