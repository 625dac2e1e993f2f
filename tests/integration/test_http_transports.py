"""The ``graph`` and ``gmail_api`` transports through the whole send path on loopback: the real
sender handler, the template's queues and tables on moto server, the sandbox token endpoints, and
the sandbox stand-ins for Graph ``sendMail`` and Gmail ``messages.send`` over HTTPS, which accept
only tokens issued for their audience and scope.
"""

from __future__ import annotations

import base64
import datetime as dt
import email
import json
from email import policy
from typing import Any

import pytest
from mailbroker.integrations import parse_integration
from mailbroker.messages.mime import build_mime, message_id_for
from mailbroker.messages.models import parse_message
from mailbroker.tokens.providers import identity_of

from mailbroker_sandbox.mail_apis import MailApiServer
from tests.fixtures.pipeline import CLIENT_SECRET, SENDER, MailPipeline

pytestmark = pytest.mark.xdist_group("moto")

CC, BCC = "cy@example.com", "hidden@example.com"


# --------------------------------------------------------------------------------------- helpers


def add_graph(pipeline: MailPipeline, api: MailApiServer, *, mailbox: bool = True, **extra: Any) -> str:
    integration_id = pipeline.add(
        "microsoft", name="graph", transport="graph", graph_endpoint=api.base_url, **extra
    )
    if mailbox:
        api.add_mailbox(SENDER)
    return integration_id


def add_gmail(pipeline: MailPipeline, api: MailApiServer, provider: str = "google", **extra: Any) -> str:
    integration_id = pipeline.add(
        provider, name="gmail", transport="gmail_api", gmail_endpoint=api.base_url, **extra
    )
    api.add_mailbox(SENDER)
    return integration_id


def api_deliveries(api: MailApiServer, message_id: str) -> int:
    wanted = message_id_for(message_id, "contoso.com")
    count = 0
    for received in api.received:
        headers = email.message_from_bytes(received.data, policy=policy.compat32)
        count += str(headers["Message-ID"]).strip() == wanted
    return count


def send_one(pipeline: MailPipeline, integration_id: str, **overrides: Any) -> tuple[dict[str, Any], Any]:
    message = pipeline.message(integration_id, **overrides)
    pipeline.post(message)
    event = pipeline.receive()
    pipeline.run(event)
    return message, event


def expected_mime(message: dict[str, Any], event: dict[str, Any]) -> bytes:
    queued_at = int(event["Records"][0]["attributes"]["SentTimestamp"]) / 1000
    return build_mime(
        parse_message(json.dumps(message)),
        message_id_domain="contoso.com",
        now=dt.datetime.fromtimestamp(queued_at, dt.UTC),
        bcc_header=True,
    ).as_bytes()


def last_error(pipeline: MailPipeline, message_id: str) -> dict[str, Any]:
    status = pipeline.status(message_id) or {}
    return status.get("last_error") or {}


# ----------------------------------------------------------------------------------------- graph


def test_graph_sends_the_mime_mailbroker_built_byte_for_byte_and_keeps_the_202(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)

    message, event = send_one(mail_pipeline, integration_id, cc=[CC], bcc=[BCC])

    [received] = mail_api_server.received
    assert received.api == "graph" and received.form == "base64"
    assert received.data == expected_mime(message, event)
    assert set(received.recipients) == {"ana@example.com", "bo@example.com", CC, BCC}
    status = mail_pipeline.status(message["id"])
    assert status["status"] == "sent"
    assert status["reply"].startswith("202 Accepted request-id=")
    assert mail_pipeline.smtp.accepted == []
    assert mail_pipeline.queue_depth() == (0, 0)


def test_bcc_recipients_receive_the_mail_but_no_recipient_sees_them(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)

    send_one(mail_pipeline, integration_id, cc=[CC], bcc=[BCC])

    [received] = mail_api_server.delivered_to(BCC)
    delivered = email.message_from_bytes(received.delivered, policy=policy.default)
    assert delivered["Bcc"] is None
    assert BCC.encode() not in received.delivered
    assert CC in str(delivered["Cc"])


def test_graph_token_has_the_graph_audience_and_is_cached_apart_from_the_smtp_token(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    graph_id = add_graph(mail_pipeline, mail_api_server)
    smtp_id = mail_pipeline.add("microsoft", name="smtp")
    graph = mail_pipeline.integrations.get(graph_id)
    smtp = mail_pipeline.integrations.get(smtp_id)

    assert graph.scope == "https://graph.microsoft.com/.default"
    assert smtp.scope == "https://outlook.office365.com/.default"
    same_app = smtp.model_copy(update={"client_id": graph.client_id, "tenant_id": graph.tenant_id})
    assert identity_of(graph).key != identity_of(same_app).key

    message, _ = send_one(mail_pipeline, graph_id)

    assert mail_pipeline.status(message["id"])["status"] == "sent"
    assert mail_api_server.tokens_refused == 0


def test_graph_sends_each_id_once_however_often_it_is_queued_or_redelivered(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)
    message = mail_pipeline.message(integration_id)
    mail_pipeline.post(message)
    mail_pipeline.post(message)

    mail_pipeline.drive()
    mail_pipeline.post(message)
    mail_pipeline.drive()

    assert api_deliveries(mail_api_server, message["id"]) == 1
    assert mail_pipeline.status(message["id"])["status"] == "sent"


def test_graph_refreshes_the_token_once_on_401_and_sends(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)
    client_id = mail_pipeline.client_id(integration_id)
    mail_pipeline.tokens.reset_counts()
    mail_api_server.fail_next("graph", "401")

    message, _ = send_one(mail_pipeline, integration_id)

    assert mail_pipeline.status(message["id"])["status"] == "sent"
    assert mail_pipeline.tokens.issued(client_id=client_id) == 2
    assert mail_api_server.requests == 2
    assert api_deliveries(mail_api_server, message["id"]) == 1


def test_a_delegated_microsoft_consent_sends_through_graph_and_rotates_its_refresh_token(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = mail_pipeline.add(
        "microsoft_delegated",
        name="graph-delegated",
        transport="graph",
        graph_endpoint=mail_api_server.base_url,
    )
    mail_api_server.add_mailbox(SENDER)
    integration = mail_pipeline.integrations.get(integration_id)
    client_id = mail_pipeline.client_id(integration_id)
    assert integration.scope == "https://graph.microsoft.com/Mail.Send offline_access"
    mail_pipeline.tokens.reset_counts()
    mail_api_server.fail_next("graph", "401")  # the 401 retry redeems the rotated refresh token

    message, _ = send_one(mail_pipeline, integration_id)

    assert mail_pipeline.status(message["id"])["status"] == "sent"
    assert api_deliveries(mail_api_server, message["id"]) == 1
    assert mail_pipeline.tokens.issued(provider="microsoft_delegated", client_id=client_id) == 2
    assert mail_pipeline.tokens.refresh_token_reuse == 0
    assert mail_pipeline.tokens.live_microsoft_refresh_tokens(client_id) == 1
    [received] = mail_api_server.received
    assert received.api == "graph"

    # The live check reads the delegated scope from the token and probes Graph, sending nothing.
    from mailbroker import runtime
    from mailbroker.keeper import live_check

    steps = live_check(integration, runtime.token_broker())
    assert all(step.ok for step in steps), steps
    assert any(step.detail == "delegated scope Mail.Send" for step in steps)
    assert len(mail_api_server.received) == 1
    assert mail_pipeline.tokens.refresh_token_reuse == 0


def test_graph_fails_for_good_when_a_fresh_token_is_refused_too(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)
    client_id = mail_pipeline.client_id(integration_id)
    mail_pipeline.tokens.reset_counts()
    mail_api_server.fail_next("graph", "401", times=5)

    message, _ = send_one(mail_pipeline, integration_id)

    assert mail_pipeline.status(message["id"])["status"] == "failed"
    assert last_error(mail_pipeline, message["id"])["code"] == "api_auth_failed"
    assert mail_pipeline.tokens.issued(client_id=client_id) == 2
    assert mail_api_server.requests == 2
    assert mail_pipeline.dead_letters()[message["id"]]["error_code"] == "api_auth_failed"


def test_an_app_with_smtp_sendasapp_but_not_mail_send_is_denied_with_the_grant_to_make(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)
    mail_pipeline.tokens.register_microsoft_app(
        "contoso", mail_pipeline.client_id(integration_id), CLIENT_SECRET, graph_roles=()
    )

    message, _ = send_one(mail_pipeline, integration_id)

    error = last_error(mail_pipeline, message["id"])
    assert mail_pipeline.status(message["id"])["status"] == "failed"
    assert error["code"] == "graph_access_denied"
    assert "Mail.Send" in error["hint"] and "New-ManagementRoleAssignment" in error["hint"]
    assert mail_api_server.received == []


def test_a_mailbox_outside_the_application_access_policy_is_denied(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server, mailbox=False)
    mail_api_server.add_mailbox(SENDER, graph_clients=["some-other-app"])

    message, _ = send_one(mail_pipeline, integration_id)

    assert last_error(mail_pipeline, message["id"])["code"] == "graph_access_denied"
    assert "ErrorAccessDenied" in last_error(mail_pipeline, message["id"])["message"]


def test_a_mailbox_graph_does_not_know_fails_as_mailbox_not_found(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server, mailbox=False)

    message, _ = send_one(mail_pipeline, integration_id)

    assert mail_pipeline.status(message["id"])["status"] == "failed"
    assert last_error(mail_pipeline, message["id"])["code"] == "mailbox_not_found"
    assert "ErrorInvalidUser" in last_error(mail_pipeline, message["id"])["message"]


@pytest.mark.parametrize(
    ("kind", "state", "code"),
    [
        ("403", "failed", "graph_access_denied"),
        ("send_as", "failed", "send_as_denied"),
        ("404", "failed", "mailbox_not_found"),
        ("not_rest", "failed", "mailbox_not_found"),
        ("413", "failed", "message_too_large"),
        ("size", "failed", "message_too_large"),
        ("recipients", "failed", "recipient_rejected"),
        ("500", "retrying", "api_transient"),
        ("503", "retrying", "api_transient"),
        ("drop", "failed", "delivery_uncertain"),
    ],
)
def test_every_graph_error_ends_in_its_state_with_its_code(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer, kind: str, state: str, code: str
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)
    mail_api_server.fail_next("graph", kind)

    message, _ = send_one(mail_pipeline, integration_id)

    assert mail_pipeline.status(message["id"])["status"] == state
    error = last_error(mail_pipeline, message["id"])
    assert error["code"] == code
    assert error["hint"]
    if state == "retrying":
        mail_pipeline.drive()
        assert mail_pipeline.status(message["id"])["status"] == "sent"
        assert api_deliveries(mail_api_server, message["id"]) == 1
    else:
        assert mail_pipeline.dead_letters()[message["id"]]["error_code"] == code
        mail_pipeline.drive()
        assert api_deliveries(mail_api_server, message["id"]) == 0


def test_graph_429_is_retried_no_sooner_than_its_retry_after(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)
    mail_api_server.fail_next("graph", "429", retry_after=400)
    first = mail_pipeline.message(integration_id)
    second = mail_pipeline.message(integration_id)
    mail_pipeline.post(first)
    mail_pipeline.post(second)

    failed = mail_pipeline.run(mail_pipeline.receive())

    assert len(failed) == 2  # the other message waits too, without an attempt
    assert all(delay >= 400 for delay in mail_pipeline.delays())
    throttled = [
        m for m in (first, second) if (mail_pipeline.status(m["id"]) or {}).get("status") == "retrying"
    ]
    assert [last_error(mail_pipeline, m["id"])["code"] for m in throttled] == ["throttled"]
    mail_pipeline.drive()
    assert all(api_deliveries(mail_api_server, m["id"]) == 1 for m in (first, second))


def test_a_message_over_graphs_request_limit_fails_before_anything_is_sent(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer, ca_trust_env: dict[str, str]
) -> None:
    from mailbroker.transports.graph import GraphSession

    integration_id = add_graph(mail_pipeline, mail_api_server)
    integration = mail_pipeline.integrations.get(integration_id)
    session = GraphSession(integration, lambda force_refresh=False: "not-used")

    from mailbroker.errors import MailbrokerError

    with pytest.raises(MailbrokerError) as raised:
        session.send(SENDER, ["ana@example.com"], b"x" * (3 * 1024 * 1024 + 1))

    assert raised.value.code == "message_too_large"
    assert mail_api_server.requests == 0


# ----------------------------------------------------------------------------------------- gmail


@pytest.mark.parametrize("provider", ["google", "google_service_account"])
def test_gmail_api_sends_the_mime_as_it_is_and_keeps_the_message_id(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer, provider: str
) -> None:
    integration_id = add_gmail(mail_pipeline, mail_api_server, provider)

    message, event = send_one(mail_pipeline, integration_id, bcc=[BCC])

    [received] = mail_api_server.received
    assert received.api == "gmail" and received.form == "media"
    assert received.data == expected_mime(message, event)
    assert BCC in received.recipients and BCC.encode() not in received.delivered
    status = mail_pipeline.status(message["id"])
    assert status["status"] == "sent"
    assert status["reply"] == f"200 id={received.id} threadId={received.id}"


def test_gmail_api_sends_each_id_once_under_redelivery(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_gmail(mail_pipeline, mail_api_server)
    message = mail_pipeline.message(integration_id)
    for _ in range(3):
        mail_pipeline.post(message)

    mail_pipeline.drive()

    assert api_deliveries(mail_api_server, message["id"]) == 1


def test_gmail_api_refreshes_the_token_once_on_401(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_gmail(mail_pipeline, mail_api_server)
    client_id = mail_pipeline.client_id(integration_id)
    mail_pipeline.tokens.reset_counts()
    mail_api_server.fail_next("gmail", "401")

    message, _ = send_one(mail_pipeline, integration_id)

    assert mail_pipeline.status(message["id"])["status"] == "sent"
    assert mail_pipeline.tokens.issued(client_id=client_id) == 2
    assert mail_api_server.requests == 2


def test_a_gmail_token_without_the_send_scope_fails_with_how_to_reconsent(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_gmail(mail_pipeline, mail_api_server)
    client_id = mail_pipeline.client_id(integration_id)
    readonly = mail_pipeline.tokens.issue_refresh_token(
        client_id, SENDER, scope="https://www.googleapis.com/auth/gmail.readonly"
    )
    integration = mail_pipeline.integrations.get(integration_id)
    data = json.loads(integration.model_dump_json()) | {
        "client_secret": CLIENT_SECRET,
        "refresh_token": readonly,
    }
    mail_pipeline.integrations.put(parse_integration(data))

    message, _ = send_one(mail_pipeline, integration_id)

    error = last_error(mail_pipeline, message["id"])
    assert mail_pipeline.status(message["id"])["status"] == "failed"
    assert error["code"] == "gmail_insufficient_scope"
    assert "gmail.send" in error["hint"] and "consent" in error["hint"]


@pytest.mark.parametrize(
    ("kind", "retry_after", "state", "code", "at_least"),
    [
        ("accessNotConfigured", None, "failed", "gmail_api_disabled", 0),
        ("failedPrecondition", None, "failed", "gmail_not_enabled", 0),
        ("invalidArgument", None, "failed", "api_rejected_message", 0),
        ("404", None, "failed", "mailbox_not_found", 0),
        ("dailyLimitExceeded", None, "retrying", "gmail_quota_exceeded", 3600),
        ("userRateLimitExceeded", 90, "retrying", "throttled", 90),
        ("rateLimitExceeded", None, "retrying", "throttled", 60),
        ("429", 300, "retrying", "throttled", 300),
        ("500", None, "retrying", "api_transient", 54),
        ("503", None, "retrying", "api_transient", 54),
    ],
)
def test_every_gmail_api_error_ends_in_its_state_with_its_code(
    mail_pipeline: MailPipeline,
    mail_api_server: MailApiServer,
    kind: str,
    retry_after: int | None,
    state: str,
    code: str,
    at_least: int,
) -> None:
    integration_id = add_gmail(mail_pipeline, mail_api_server)
    mail_api_server.fail_next("gmail", kind, retry_after=retry_after)

    message, _ = send_one(mail_pipeline, integration_id)

    assert mail_pipeline.status(message["id"])["status"] == state
    assert last_error(mail_pipeline, message["id"])["code"] == code
    if state == "retrying":
        assert mail_pipeline.delays()[-1] >= at_least
        assert mail_pipeline.dead_letters() == {}
        mail_pipeline.drive()
        assert api_deliveries(mail_api_server, message["id"]) == 1
    else:
        assert mail_pipeline.dead_letters()[message["id"]]["error_code"] == code


def test_one_keep_alive_connection_carries_a_batch(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    graph_id = add_graph(mail_pipeline, mail_api_server)
    gmail_id = mail_pipeline.add(
        "google",
        name="gmail",
        transport="gmail_api",
        gmail_endpoint=mail_api_server.base_url,
        username="ana@gmail.example",
        senders=[{"email": "ana@gmail.example"}],
    )
    mail_api_server.add_mailbox("ana@gmail.example")
    for _ in range(4):
        mail_pipeline.post(mail_pipeline.message(graph_id))
        mail_pipeline.post(mail_pipeline.message(gmail_id, **{"from": {"email": "ana@gmail.example"}}))

    assert mail_pipeline.run(mail_pipeline.receive()) == []

    assert len(mail_api_server.received) == 8
    assert mail_api_server.requests == 8
    assert mail_api_server.connections == 2


def test_graph_mail_leaves_no_token_in_the_status_record_or_dead_letter(
    mail_pipeline: MailPipeline, mail_api_server: MailApiServer
) -> None:
    integration_id = add_graph(mail_pipeline, mail_api_server)
    mail_api_server.fail_next("graph", "401", times=2)
    message, _ = send_one(mail_pipeline, integration_id)

    written = json.dumps(mail_pipeline.status(message["id"])) + json.dumps(mail_pipeline.dead_letters())

    assert "eyJ" not in written and CLIENT_SECRET not in written
    assert base64.b64encode(CLIENT_SECRET.encode()).decode() not in written
