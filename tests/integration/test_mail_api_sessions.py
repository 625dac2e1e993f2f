"""The Graph and Gmail API sessions against the sandbox stand-ins over HTTPS, with real tokens from
the sandbox token endpoints (MSAL, google-auth): what goes over the wire, the one refresh on 401,
the keep-alive connection, and the stand-ins refusing tokens of the wrong audience or scope."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from mailbroker.errors import MailbrokerError
from mailbroker.integrations import parse_integration
from mailbroker.tokens.providers import TokenProviders
from mailbroker.transports import api_session

from mailbroker_sandbox.mail_apis import MailApiServer

MAILBOX = "support@contoso.com"
SECRET = "planted-session-secret-0e7a"
MIME = (
    b"From: Support <support@contoso.com>\r\nTo: ana@example.com\r\nBcc: hidden@example.com\r\n"
    b"Subject: hello\r\nMessage-ID: <abc@contoso.com>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
)


class Tokens:
    """A TokenSource over the real providers, counting forced refreshes."""

    def __init__(self, integration: Any) -> None:
        self.integration = integration
        self.providers = TokenProviders(http_timeout=5)
        self.forced = 0
        self.last = ""

    def __call__(self, force_refresh: bool = False) -> str:
        self.forced += force_refresh
        self.last = self.providers.fetch(self.integration).access_token
        return self.last


@pytest.fixture
def graph(token_server: Any, mail_api_server: MailApiServer, ca_trust_env: dict[str, str]) -> Any:
    token_server.register_microsoft_app("contoso", "graph-app", SECRET)
    mail_api_server.add_mailbox(MAILBOX)
    return parse_integration(
        {
            "id": "graph-session",
            "provider": "microsoft",
            "transport": "graph",
            "graph_endpoint": mail_api_server.base_url,
            "username": MAILBOX,
            "tenant_id": "contoso",
            "client_id": "graph-app",
            "client_secret": SECRET,
            "authority": token_server.base_url,
        }
    )


@pytest.fixture
def gmail(token_server: Any, mail_api_server: MailApiServer, ca_trust_env: dict[str, str]) -> Any:
    token_server.register_google_client("gmail-client", SECRET)
    mail_api_server.add_mailbox(MAILBOX)
    return parse_integration(
        {
            "id": "gmail-session",
            "provider": "google",
            "transport": "gmail_api",
            "gmail_endpoint": mail_api_server.base_url,
            "username": MAILBOX,
            "client_id": "gmail-client",
            "client_secret": SECRET,
            "refresh_token": token_server.issue_refresh_token("gmail-client", MAILBOX),
            "token_uri": token_server.google_token_uri,
        }
    )


def test_the_graph_token_is_for_graph_with_the_mail_send_role(graph: Any) -> None:
    claims = jwt.decode(Tokens(graph)(), options={"verify_signature": False})

    assert claims["aud"] == "https://graph.microsoft.com"
    assert claims["roles"] == ["Mail.Send"]


def test_graph_session_posts_the_exact_bytes_base64_and_keeps_one_connection(
    graph: Any, mail_api_server: MailApiServer
) -> None:
    with api_session(graph, Tokens(graph)) as session:
        results = [session.send(MAILBOX, ["ana@example.com", "hidden@example.com"], MIME) for _ in range(3)]

    assert [m.data for m in mail_api_server.received] == [MIME] * 3
    assert mail_api_server.received[0].recipients == ("ana@example.com", "hidden@example.com")
    assert all(r.reply.startswith("202 Accepted") and r.requests == 1 for r in results)
    assert mail_api_server.connections == 1
    assert mail_api_server.requests == 3


def test_gmail_session_uploads_the_mime_as_message_rfc822(gmail: Any, mail_api_server: MailApiServer) -> None:
    with api_session(gmail, Tokens(gmail)) as session:
        result = session.send(MAILBOX, ["ana@example.com"], MIME)

    [received] = mail_api_server.received
    assert (received.data, received.form) == (MIME, "media")
    assert result.reply == f"200 id={received.id} threadId={received.id}"
    assert b"hidden@example.com" not in received.delivered


@pytest.mark.parametrize(("api", "name"), [("graph", "graph"), ("gmail", "gmail")])
def test_a_401_costs_one_fresh_token_and_one_more_request(
    request: pytest.FixtureRequest, mail_api_server: MailApiServer, api: str, name: str
) -> None:
    integration = request.getfixturevalue(name)
    tokens = Tokens(integration)
    mail_api_server.fail_next(api, "401")

    with api_session(integration, tokens) as session:
        result = session.send(MAILBOX, ["ana@example.com"], MIME)

    assert tokens.forced == 1
    assert result.requests == 2
    assert len(mail_api_server.received) == 1


def test_graph_refuses_an_outlook_token_as_api_auth_failed(
    graph: Any, token_server: Any, mail_api_server: MailApiServer
) -> None:
    outlook = graph.model_copy(update={"scope": "https://outlook.office365.com/.default"})
    tokens = Tokens(outlook)

    with api_session(graph, tokens) as session, pytest.raises(MailbrokerError) as raised:
        session.send(MAILBOX, ["ana@example.com"], MIME)

    assert raised.value.code == "api_auth_failed"
    assert tokens.forced == 1
    assert tokens.last not in str(raised.value.to_dict())
    assert mail_api_server.tokens_refused == 2
    assert mail_api_server.received == []


def test_a_dropped_answer_is_delivery_uncertain(graph: Any, mail_api_server: MailApiServer) -> None:
    mail_api_server.fail_next("graph", "drop")

    with api_session(graph, Tokens(graph)) as session, pytest.raises(MailbrokerError) as raised:
        session.send(MAILBOX, ["ana@example.com"], MIME)

    assert raised.value.code == "delivery_uncertain"


def test_an_api_endpoint_on_the_metadata_address_gets_no_token(graph: Any) -> None:
    aimed = graph.model_copy(update={"graph_endpoint": "https://169.254.169.254"})
    tokens = Tokens(graph)

    with pytest.raises(MailbrokerError) as raised:
        api_session(aimed, tokens).open()

    assert raised.value.code == "address_not_allowed"
    assert tokens.last == ""


# --- the live check: claims and an empty request, nothing sent ------------------------------------


def _steps(integration: Any) -> list[tuple[str, bool, str | None]]:
    from mailbroker.transports.check import api_check

    return [(s.name, s.ok, s.code) for s in api_check(integration, Tokens(integration)(), timeout=5)]


def test_graph_check_passes_without_sending(graph: Any, mail_api_server: MailApiServer) -> None:
    assert _steps(graph) == [("audience", True, None), ("role", True, None), ("api", True, None)]
    assert mail_api_server.received == []


def test_graph_check_explains_smtp_sendasapp_granted_where_mail_send_is_needed(
    graph: Any, token_server: Any
) -> None:
    from mailbroker.transports.check import api_check

    token_server.register_microsoft_app("contoso", "graph-app", SECRET, graph_roles=("SMTP.SendAsApp",))

    *_, role = api_check(graph, Tokens(graph)(), timeout=5)

    assert (role.name, role.ok, role.code) == ("role", False, "graph_access_denied")
    assert "SMTP.SendAsApp" in (role.hint or "") and "Mail.Send" in (role.hint or "")


def test_graph_check_explains_an_smtp_token_given_to_graph(graph: Any) -> None:
    from mailbroker.transports.check import api_check

    outlook = graph.model_copy(update={"scope": "https://outlook.office365.com/.default"})

    [audience] = api_check(graph, Tokens(outlook)(), timeout=5)

    assert (audience.ok, audience.code) == (False, "api_auth_failed")
    assert "SMTP" in audience.detail


def test_graph_check_finds_a_mailbox_outside_the_application_access_policy(
    graph: Any, mail_api_server: MailApiServer
) -> None:
    mail_api_server.add_mailbox(MAILBOX, graph_clients=["another-app"])

    assert _steps(graph)[-1] == ("api", False, "graph_access_denied")


def test_gmail_check_passes_without_sending(gmail: Any, mail_api_server: MailApiServer) -> None:
    assert _steps(gmail) == [("scope", True, None), ("api", True, None)]
    assert mail_api_server.received == []


def test_gmail_check_names_a_token_without_the_send_scope(gmail: Any, token_server: Any) -> None:
    readonly = token_server.issue_refresh_token(
        "gmail-client", MAILBOX, scope="https://www.googleapis.com/auth/gmail.readonly"
    )
    narrowed = parse_integration(json_of(gmail) | {"refresh_token": readonly, "client_secret": SECRET})

    assert _steps(narrowed) == [("scope", False, "gmail_insufficient_scope")]


def test_gmail_check_finds_the_api_disabled_in_the_cloud_project(
    gmail: Any, mail_api_server: MailApiServer
) -> None:
    mail_api_server.fail_next("gmail", "accessNotConfigured")

    assert _steps(gmail)[-1] == ("api", False, "gmail_api_disabled")


def json_of(integration: Any) -> dict[str, Any]:
    import json

    return json.loads(integration.model_dump_json())
