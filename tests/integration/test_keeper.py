"""The keeper function against real protocol peers on loopback: the stack's tables, topic and
secrets on moto server, the sandbox's Entra ID / Google / OAuth2 endpoints, and the sandbox SMTP
server. Alerts are read the way an operator gets them: an SQS queue subscribed to the topic."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import uuid

import pytest
from mailbroker import runtime
from mailbroker.integrations import IntegrationStore, parse_integration

from mailbroker_sandbox.aws import provision
from mailbroker_sandbox.local import powertools_from_env
from tests.fixtures.events import LambdaContext, http_event, sample

HEALTH = "GET /v1/integrations/{id}/health"
CHECK = "POST /v1/integrations/{id}/check"


def context(name: str = "keeper") -> LambdaContext:
    return LambdaContext(name, timeout_seconds=300)


class Deployment:
    """A stack of its own (own secret prefix) with the keeper's and token broker's environment."""

    def __init__(self, stack, token_server, smtp) -> None:
        self.stack = stack
        self.tokens = token_server
        self.smtp = smtp
        self.prefix = stack.parameters["SecretPrefix"]
        self.store = IntegrationStore(stack.client("secretsmanager"), self.prefix, max_age=0)
        sqs = stack.client("sqs")
        self.inbox = sqs.create_queue(QueueName=f"{stack.name}-inbox")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self.inbox, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        stack.client("sns").subscribe(TopicArn=stack.topic_arn, Protocol="sqs", Endpoint=arn)

    def smtp_endpoint(self) -> dict:
        return {"host": "127.0.0.1", "port": self.smtp.port, "security": "starttls", "timeout_seconds": 5}

    def add(self, document: dict) -> None:
        self.store.put(parse_integration({"smtp": self.smtp_endpoint(), **document}))

    def microsoft(
        self, integration_id: str, *, secret_expires_at=None, registered_secret=None, **extra
    ) -> dict:
        tenant, app, secret = str(uuid.uuid4()), str(uuid.uuid4()), secrets.token_urlsafe(16)
        self.tokens.register_microsoft_app(
            tenant, app, registered_secret or secret, secret_expires_at=secret_expires_at
        )
        mailbox = f"{integration_id}@contoso.example"
        self.smtp.add_mailbox(mailbox, allowed_clients=[app])
        document = {
            "id": integration_id,
            "provider": "microsoft",
            "username": mailbox,
            "tenant_id": tenant,
            "client_id": app,
            "client_secret": secret,
            "authority": self.tokens.microsoft_authority(),
            **extra,
        }
        self.add(document)
        return document

    def google(self, integration_id: str, *, revoked: bool = False) -> dict:
        client_id, client_secret = f"{uuid.uuid4().hex}.apps.example", secrets.token_urlsafe(16)
        self.tokens.register_google_client(client_id, client_secret)
        mailbox = f"{integration_id}@gmail.example"
        refresh = self.tokens.issue_refresh_token(client_id, mailbox)
        if revoked:
            self.tokens.revoke_refresh_token(refresh)
        self.smtp.add_mailbox(mailbox)
        document = {
            "id": integration_id,
            "provider": "google",
            "username": mailbox,
            "client_id": client_id,
            "client_secret": client_secret,
            "refresh_token": refresh,
            "token_uri": self.tokens.google_token_uri,
        }
        self.add(document)
        return document

    def oauth2(self, integration_id: str, token_url: str | None = None) -> dict:
        client_id, client_secret = f"client-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
        self.tokens.register_oauth2_client(client_id, client_secret, scope="smtp.send")
        mailbox = f"{integration_id}@relay.example"
        self.smtp.add_mailbox(mailbox, allowed_clients=[client_id])
        document = {
            "id": integration_id,
            "provider": "oauth2",
            "username": mailbox,
            "token_url": token_url or self.tokens.oauth2_token_url,
            "client_id": client_id,
            "client_secret": client_secret,
            "scope": "smtp.send",
        }
        self.add(document)
        return document

    def alerts(self) -> list[dict]:
        sqs = self.stack.client("sqs")
        found = []
        deadline = time.monotonic() + 0.5  # SNS to SQS fan-out on moto is synchronous; allow a beat
        while True:
            batch = sqs.receive_message(QueueUrl=self.inbox, MaxNumberOfMessages=10).get("Messages", [])
            if not batch:
                if time.monotonic() > deadline:
                    return found
                time.sleep(0.05)
                continue
            for message in batch:
                envelope = json.loads(message["Body"])
                attributes = {k: v["Value"] for k, v in envelope.get("MessageAttributes", {}).items()}
                found.append({"subject": envelope["Subject"], "message": envelope["Message"], **attributes})
                sqs.delete_message(QueueUrl=self.inbox, ReceiptHandle=message["ReceiptHandle"])

    def run_keeper(self) -> dict:
        from keeper.app import lambda_handler

        return lambda_handler(sample("schedule.json"), context())

    def http(self, route: str, integration_id: str) -> tuple[int, dict]:
        from token_broker.app import lambda_handler

        event = http_event(route, path_parameters={"id": integration_id})
        answer = lambda_handler(event, context("token-broker"))
        return answer["statusCode"], json.loads(answer["body"])


@pytest.fixture
def deployment(moto_server, template, aws_env, ca_trust_env, token_server, smtp_server, monkeypatch):
    stack = provision(
        template,
        endpoint_url=moto_server.endpoint_url,
        parameters={"SecretPrefix": f"keeper-{secrets.token_hex(4)}/"},
    )
    for name, value in {
        **stack.function_env("TokenBrokerFunction"),
        **stack.function_env("KeeperFunction"),
    }.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    powertools_from_env(os.environ)
    deployed = Deployment(stack, token_server, smtp_server())
    yield deployed
    for integration_id in deployed.store.list_ids():
        deployed.store.delete(integration_id)
    stack.delete()
    runtime.reset()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_keeper_records_a_mix_and_alerts_once_per_transition(deployment):
    deployment.microsoft("healthy", smtp_check=True)
    deployment.microsoft(
        "expired-secret", secret_expires_at=time.time() - 86400, client_secret_expires_at="2020-01-31"
    )
    deployment.google("invalid-grant", revoked=True)
    unreachable = deployment.oauth2("unreachable", token_url=f"https://127.0.0.1:{closed_port()}/token")

    first = deployment.run_keeper()
    first_alerts = deployment.alerts()
    second = deployment.run_keeper()
    second_alerts = deployment.alerts()

    assert first["healthy"] == second["healthy"] == ["healthy"]
    assert first["unhealthy"] == ["expired-secret", "invalid-grant", "unreachable"]
    assert sorted((a["integration"], a["kind"]) for a in first_alerts) == [
        ("expired-secret", "secret_expiring"),
        ("expired-secret", "unhealthy"),
        ("invalid-grant", "reconsent"),
        ("unreachable", "unhealthy"),
    ]
    assert second_alerts == []

    deployment.add({**unreachable, "token_url": deployment.tokens.oauth2_token_url})
    deployment.run_keeper()
    assert [(a["integration"], a["kind"]) for a in deployment.alerts()] == [("unreachable", "recovered")]


def test_health_route_serves_each_record_with_code_and_hint(deployment):
    deployment.microsoft("healthy", smtp_check=True)
    deployment.microsoft("expired-secret", secret_expires_at=time.time() - 60)
    deployment.google("invalid-grant", revoked=True)
    deployment.run_keeper()

    healthy = deployment.http(HEALTH, "healthy")
    expired = deployment.http(HEALTH, "expired-secret")
    revoked = deployment.http(HEALTH, "invalid-grant")

    assert healthy[0] == 200
    assert healthy[1]["healthy"] is True and healthy[1]["smtp_checked"] is True
    assert healthy[1]["last_error"] is None and healthy[1]["consecutive_failures"] == 0
    assert healthy[1]["token_expires_at"] and healthy[1]["last_success"]
    assert expired[1]["last_error"]["code"] == "token_invalid_client"
    assert "AADSTS7000222" in expired[1]["last_error"]["message"]
    assert revoked[1]["last_error"]["code"] == "token_invalid_grant"
    assert "mailbroker consent google" in revoked[1]["last_error"]["hint"]


def test_health_route_answers_404_before_the_keeper_has_run(deployment):
    deployment.microsoft("new")

    status, body = deployment.http(HEALTH, "new")
    unknown_status, unknown = deployment.http(HEALTH, "nobody")

    assert (status, body["error"]["code"]) == (404, "not_found")
    assert (unknown_status, unknown["error"]["code"]) == (404, "unknown_integration")


def test_live_smtp_check_names_smtp_auth_disabled_on_the_mailbox(deployment):
    document = deployment.microsoft("disabled", smtp_check=True)
    deployment.smtp.add_mailbox(
        document["username"], allowed_clients=[document["client_id"]], smtp_auth_disabled=True
    )

    summary = deployment.run_keeper()
    status, check = deployment.http(CHECK, "disabled")

    assert summary["unhealthy"] == ["disabled"]
    assert status == 200 and check["ok"] is False
    failed = [step for step in check["steps"] if not step["ok"]]
    assert [(s["name"], s["code"]) for s in failed] == [("auth", "smtp_auth_disabled")]
    assert "SmtpClientAuthenticationDisabled" in failed[0]["hint"]


def test_live_check_route_passes_every_step_for_a_good_integration(deployment):
    deployment.google("good")
    accepted_before = len(deployment.smtp.accepted)

    status, check = deployment.http(CHECK, "good")

    assert status == 200 and check["ok"] is True
    assert [s["name"] for s in check["steps"]] == ["token", "connect", "tls", "ehlo", "auth", "quit"]
    assert len(deployment.smtp.accepted) == accepted_before  # no mail is sent


def test_live_check_route_for_graph_checks_the_claims_and_an_empty_request_without_sending(
    deployment, mail_api_server
):
    document = deployment.microsoft(
        "graph-good", transport="graph", graph_endpoint=mail_api_server.base_url, smtp_check=True
    )
    mail_api_server.add_mailbox(document["username"])

    status, check = deployment.http(CHECK, "graph-good")
    summary = deployment.run_keeper()

    assert status == 200 and check["ok"] is True
    assert [s["name"] for s in check["steps"]] == ["token", "audience", "role", "api"]
    assert "graph-good" in summary["healthy"]
    assert mail_api_server.received == []  # no mail is sent


def test_live_check_route_explains_smtp_sendasapp_where_graph_needs_mail_send(deployment, mail_api_server):
    document = deployment.microsoft(
        "graph-smtp-role", transport="graph", graph_endpoint=mail_api_server.base_url
    )
    deployment.tokens.register_microsoft_app(
        document["tenant_id"],
        document["client_id"],
        document["client_secret"],
        graph_roles=("SMTP.SendAsApp",),
    )

    status, check = deployment.http(CHECK, "graph-smtp-role")

    failed = [step for step in check["steps"] if not step["ok"]]
    assert status == 200 and check["ok"] is False
    assert [(s["name"], s["code"]) for s in failed] == [("role", "graph_access_denied")]
    assert "SMTP.SendAsApp" in failed[0]["hint"] and "Mail.Send" in failed[0]["hint"]


def test_refresh_token_is_exercised_against_the_provider_every_keep_alive_period(deployment, token_server):
    from mailbroker.handlers.keeper import build_keeper
    from mailbroker.settings import KeeperSettings, get_settings

    token_server.lifetime = 30 * 86400  # access tokens outlive the keep-alive period
    document = deployment.google("kept-alive")
    now = [time.time()]
    clock = lambda: now[0]  # noqa: E731
    settings = get_settings(KeeperSettings)
    broker = runtime.build_token_broker(settings, runtime.integration_store(), clock=clock)

    def run_at(offset_days: float) -> dict:
        now[0] = start + offset_days * 86400
        broker.forget_memory()  # each scheduled run is a fresh execution environment
        return build_keeper(settings, broker=broker, clock=clock).run().to_dict()

    start = now[0]
    runs = [run_at(0), run_at(3), run_at(6.9), run_at(7.01), run_at(10)]

    issued = token_server.issued(provider="google", client_id=document["client_id"])
    assert [r["refreshed"] for r in runs] == [["kept-alive"], [], [], ["kept-alive"], []]
    assert issued == 2


def test_keeper_summary_and_alerts_hold_no_credential(deployment, capsys):
    document = deployment.google("leaky", revoked=True)

    summary = deployment.run_keeper()
    alerts = deployment.alerts()
    _, record = deployment.http(HEALTH, "leaky")

    text = json.dumps([summary, alerts, record]) + capsys.readouterr().out
    for secret in (document["refresh_token"], document["client_secret"]):
        assert secret not in text


def test_delegated_microsoft_credential_older_than_keep_alive_is_refreshed_and_keeps_working(
    deployment, token_server
):
    from mailbroker.handlers.keeper import build_keeper
    from mailbroker.settings import KeeperSettings, get_settings

    token_server.lifetime = 30 * 86400  # access tokens outlive the keep-alive period
    client_id = f"public-{uuid.uuid4().hex[:8]}"
    token_server.register_microsoft_app("consumers", client_id, public_client=True)
    mailbox = "kept@outlook.example"
    deployment.smtp.add_mailbox(mailbox)
    deployment.add(
        {
            "id": "outlook-kept",
            "provider": "microsoft_delegated",
            "username": mailbox,
            "tenant_id": "consumers",
            "client_id": client_id,
            "refresh_token": token_server.issue_microsoft_refresh_token("consumers", client_id, mailbox),
            "authority": token_server.microsoft_authority(),
            "smtp_check": True,
        }
    )
    now = [time.time()]
    clock = lambda: now[0]  # noqa: E731
    settings = get_settings(KeeperSettings)
    broker = runtime.build_token_broker(settings, runtime.integration_store(), clock=clock)

    def run_at(offset_days: float) -> dict:
        now[0] = start + offset_days * 86400
        broker.forget_memory()  # each scheduled run is a fresh execution environment
        return build_keeper(settings, broker=broker, clock=clock).run().to_dict()

    start = now[0]
    runs = [run_at(0), run_at(5), run_at(7.01), run_at(14.02), run_at(15)]

    assert [r["refreshed"] for r in runs] == [["outlook-kept"], [], ["outlook-kept"], ["outlook-kept"], []]
    assert all(r["healthy"] == ["outlook-kept"] for r in runs)  # the live SMTP check passes each time
    assert token_server.refresh_token_reuse == 0
    assert token_server.live_microsoft_refresh_tokens(client_id) == 1
    record = deployment.store.get("outlook-kept")
    assert token_server.issued(client_id=client_id) == 3
    assert record.refresh_token.get_secret_value()  # the secret holds a refresh token of the chain


def test_delegated_credential_microsoft_stopped_accepting_alerts_once_with_the_reconsent_command(
    deployment, token_server
):
    client_id = f"public-{uuid.uuid4().hex[:8]}"
    token_server.register_microsoft_app("consumers", client_id, public_client=True)
    deployment.add(
        {
            "id": "outlook-idle",
            "provider": "microsoft_delegated",
            "username": "idle@outlook.example",
            "tenant_id": "consumers",
            "client_id": client_id,
            "refresh_token": token_server.issue_microsoft_refresh_token(
                "consumers", client_id, "idle@outlook.example"
            ),
            "authority": token_server.microsoft_authority(),
        }
    )
    token_server.expire_microsoft_refresh_tokens(client_id)

    deployment.run_keeper()
    deployment.run_keeper()

    alerts = deployment.alerts()
    assert [a["kind"] for a in alerts] == ["reconsent"]
    assert alerts[0]["command"] == "mailbroker consent microsoft outlook-idle"
    assert "AADSTS700082" in alerts[0]["message"]
