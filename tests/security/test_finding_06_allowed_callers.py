"""Finding 6: the token route was open by default, and no mailbox had its own callers.

With ``TokenApiPrincipals`` empty, any IAM-authorised caller got every integration's token; with
it set, a listed role still got every integration's token. The sender trusted the message's
``integration`` field, so any app that could send to the queue could send as any mailbox.

Now an integration lists ``allowed_callers``: the HTTP API matches the request's IAM principal
(as API Gateway's IAM authoriser reports it), the sender matches the SQS ``SenderId`` (which moto
server, like SQS, sets from the sending principal). The token route is closed unless the stack
or the integration names the caller.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from mailbroker import runtime
from mailbroker.integrations import IntegrationStore, parse_integration
from moto.sqs.models import DEFAULT_SENDER_ID

from mailbroker_cli.main import main
from tests.fixtures.pipeline import SENDER

EVENTS = Path(__file__).resolve().parents[2] / "events"
APP_ROLE = "arn:aws:iam::123456789012:role/app-role"  # the caller of events/http_*.json
APP_ROLE_ID = "AROAEXAMPLE"  # its unique id, as the events' userId reports it
OTHER_ROLE = "arn:aws:iam::123456789012:role/other-app"


def http_event(
    name: str, integration_id: str | None = None, *, body: str | None = None, role: str | None = None
):
    event = copy.deepcopy(json.loads((EVENTS / name).read_text()))
    if integration_id is not None:
        event["pathParameters"]["id"] = integration_id
        event["rawPath"] = event["rawPath"].replace("support-m365", integration_id)
        event["requestContext"]["http"]["path"] = event["rawPath"]
    if body is not None:
        event["body"] = body
    if role is not None:
        iam = event["requestContext"]["authorizer"]["iam"]
        iam["userArn"] = role.replace(":iam::", ":sts::").replace(":role/", ":assumed-role/") + "/session"
        iam["userId"] = "AROAOTHERAPP00000000:session"
    return event


class _Context:
    function_name = "TokenBrokerFunction"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:TokenBrokerFunction"
    aws_request_id = "c0ffee00-0000-4000-8000-000000000006"


def invoke(event):
    from token_broker.app import lambda_handler

    answer = lambda_handler(event, _Context())
    return answer["statusCode"], json.loads(answer.get("body") or "{}")


@pytest.fixture
def api(stack, aws_env, token_server, ca_trust_env, monkeypatch):
    """The token broker's HTTP API against the sandbox; ``add`` registers a Microsoft integration."""
    for name, value in stack.function_env("TokenBrokerFunction").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TOKEN_API_PRINCIPALS", raising=False)
    runtime.reset()
    store = IntegrationStore(
        runtime.aws_client("secretsmanager"), stack.parameters["SecretPrefix"], max_age=0
    )

    class Api:
        def add(self, integration_id: str, **extra) -> None:
            token_server.register_microsoft_app("contoso", f"app-{integration_id}", "f6-secret")
            store.put(
                parse_integration(
                    {
                        "id": integration_id,
                        "provider": "microsoft",
                        "smtp": {"host": "127.0.0.1", "port": 2587},
                        "username": "support@contoso.com",
                        "tenant_id": "contoso",
                        "client_id": f"app-{integration_id}",
                        "client_secret": "f6-secret",
                        "authority": token_server.base_url,
                        **extra,
                    }
                )
            )

        def stack_principals(self, value: str) -> None:
            monkeypatch.setenv("TOKEN_API_PRINCIPALS", value)
            runtime.reset()

        def queued(self) -> int:
            sqs = runtime.aws_client("sqs")
            attributes = sqs.get_queue_attributes(
                QueueUrl=stack.function_env("TokenBrokerFunction")["SEND_QUEUE_URL"],
                AttributeNames=["ApproximateNumberOfMessages"],
            )
            return int(attributes["Attributes"]["ApproximateNumberOfMessages"])

    yield Api()
    runtime.reset()


# ---------------------------------------------------------------- the token route


def test_finding_6_token_route_is_closed_by_default(api):
    api.add("m365")

    status, body = invoke(http_event("http_post_token.json", "m365"))

    assert status == 403 and body["error"]["code"] == "caller_not_allowed"
    assert "access_token" not in body


def test_finding_6_a_caller_named_by_neither_learns_nothing_about_unknown_integrations(api):
    status, body = invoke(http_event("http_post_token.json", "no-such-integration"))

    assert status == 403 and body["error"]["code"] == "caller_not_allowed"


@pytest.mark.parametrize("entry", [APP_ROLE, APP_ROLE_ID, "123456789012"])
def test_finding_6_the_integrations_allowed_callers_open_its_token_route(api, entry):
    api.add("m365", allowed_callers=[entry])

    status, body = invoke(http_event("http_post_token.json", "m365"))

    assert status == 200 and body["access_token"]


def test_finding_6_a_caller_allowed_on_one_integration_gets_no_token_of_another(api):
    api.add("mine", allowed_callers=[APP_ROLE])
    api.add("theirs", allowed_callers=[OTHER_ROLE])

    assert invoke(http_event("http_post_token.json", "mine"))[0] == 200
    status, body = invoke(http_event("http_post_token.json", "theirs"))

    assert status == 403 and body["error"]["code"] == "caller_not_allowed"
    assert invoke(http_event("http_post_token.json", "theirs", role=OTHER_ROLE))[0] == 200


def test_finding_6_stack_principals_still_take_every_integrations_token(api):
    api.add("m365")
    api.stack_principals(APP_ROLE)

    assert invoke(http_event("http_post_token.json", "m365"))[0] == 200
    assert invoke(http_event("http_post_token.json", "m365", role=OTHER_ROLE))[0] == 403


# ---------------------------------------------------------------- POST /v1/messages


def _message(integration_id: str) -> str:
    body = json.loads((EVENTS / "message.json").read_text())
    body.update(integration=integration_id, id=f"f6-{integration_id}", attachments=[])
    return json.dumps(body)


def test_finding_6_posting_a_message_as_a_caller_not_allowed_queues_nothing(api):
    api.add("m365", allowed_callers=[OTHER_ROLE], senders=[{"email": "support@contoso.com"}])

    status, body = invoke(http_event("http_post_message.json", body=_message("m365")))

    assert status == 403 and body["error"]["code"] == "caller_not_allowed"
    assert api.queued() == 0


def test_finding_6_posting_a_message_as_an_allowed_caller_queues_it(api):
    api.add("m365", allowed_callers=[APP_ROLE], senders=[{"email": "support@contoso.com"}])

    status, body = invoke(http_event("http_post_message.json", body=_message("m365")))

    assert status == 202 and body["status"] == "queued"
    assert api.queued() == 1


# ---------------------------------------------------------------- the queue


def test_finding_6_a_queued_message_from_a_sender_not_allowed_fails_as_caller_not_allowed(mail_pipeline):
    pipeline = mail_pipeline
    integration = pipeline.add("microsoft", name="guarded", allowed_callers=["AROAPAYROLLAPP000000"])
    message = pipeline.message(integration)
    pipeline.post(message)  # moto records this test's principal as SenderId, as SQS would

    pipeline.drive()

    outcome = pipeline.outcome(message["id"])
    assert outcome.deliveries == 0
    assert outcome.state == "failed" and outcome.code == "caller_not_allowed"
    assert "allowed_callers" in outcome.dead_letter["error_hint"]
    assert outcome.status["last_error"]["code"] == "caller_not_allowed"


def test_finding_6_a_queued_message_from_an_allowed_sender_is_delivered(mail_pipeline):
    pipeline = mail_pipeline
    integration = pipeline.add("microsoft", name="open-to-me", allowed_callers=[DEFAULT_SENDER_ID])
    message = pipeline.message(integration)
    pipeline.post(message)

    pipeline.drive()

    assert pipeline.delivered(message["id"]) == 1


def test_finding_6_a_message_the_api_queued_after_checking_its_caller_is_delivered(mail_pipeline):
    """The HTTP API checked the caller; its role id (API_SENDER_ROLE_ID) is what SQS reports."""
    pipeline = mail_pipeline
    pipeline.setenv("API_SENDER_ROLE_ID", DEFAULT_SENDER_ID)
    integration = pipeline.add("microsoft", name="via-api", allowed_callers=[APP_ROLE])
    message = pipeline.message(integration)
    pipeline.post(message)

    pipeline.drive()

    assert pipeline.delivered(message["id"]) == 1


@pytest.mark.parametrize("allowed", [False, True])
def test_finding_6_the_http_transports_are_guarded_the_same_way(mail_pipeline, mail_api_server, allowed):
    """Graph sendMail: the SenderId check comes before any transport, so a caller not allowed
    reaches no mail API; an allowed one is delivered through it."""
    pipeline = mail_pipeline
    integration = pipeline.add(
        "microsoft",
        name="graph-guarded",
        transport="graph",
        graph_endpoint=mail_api_server.base_url,
        allowed_callers=[DEFAULT_SENDER_ID if allowed else "AROAPAYROLLAPP000000"],
    )
    mail_api_server.add_mailbox(SENDER)
    message = pipeline.message(integration)
    pipeline.post(message)

    pipeline.drive()

    outcome = pipeline.outcome(message["id"])
    if allowed:
        assert outcome.state == "sent" and len(mail_api_server.received) == 1
    else:
        assert outcome.state == "failed" and outcome.code == "caller_not_allowed"
        assert mail_api_server.received == []


# ---------------------------------------------------------------- registration


def test_finding_6_integration_add_resolves_a_role_arn_to_its_unique_id(
    stack, aws_env, monkeypatch, tmp_path
):
    for name, value in stack.function_env("KeeperFunction").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NO_COLOR", "1")
    runtime.reset()
    iam = runtime.aws_client("iam")
    name = f"payroll-{stack.parameters['SecretPrefix'].strip('/')}"
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument="{}")["Role"]
    (tmp_path / "password").write_text("p")
    try:
        code = main(["integration", "add", "relay", "--provider", "basic", "--username", "a@example.com",
                     "--smtp-host", "smtp.example.com", "--password-file", str(tmp_path / "password"),
                     "--allowed-caller", role["Arn"], "--allowed-caller", "210987654321"])  # fmt: skip
        store = IntegrationStore(
            runtime.aws_client("secretsmanager"), stack.parameters["SecretPrefix"], max_age=0
        )

        assert code == 0
        assert store.get("relay").allowed_callers == [role["Arn"], role["RoleId"], "210987654321"]
        assert role["RoleId"].startswith("AROA")
    finally:
        iam.delete_role(RoleName=role["RoleName"])
        runtime.reset()


@pytest.mark.parametrize("entry", ["app-role", "arn:aws:s3:::bucket", "*", "12345"])
def test_finding_6_allowed_callers_must_name_principals(entry):
    with pytest.raises(Exception) as refused:
        parse_integration(
            {
                "id": "x",
                "provider": "basic",
                "smtp": {"host": "h.example.com"},
                "username": "a@example.com",
                "password": "p",
                "allowed_callers": [entry],
            }
        )

    assert "allowed_callers" in str(refused.value)
