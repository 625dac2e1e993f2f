"""One message's whole path: ``POST /v1/messages`` to the token broker function (API Gateway HTTP
API payload v2, events/http_post_message.json's shape) → the send queue on the moto server → the
sender function → the sandbox SMTP server over STARTTLS with a sandbox-issued XOAUTH2 token →
``GET /v1/messages/{id}`` saying ``sent`` with the server's reply.
"""

from __future__ import annotations

import base64
import datetime as dt
import email
import json
import uuid
from collections.abc import Iterator
from email import policy
from pathlib import Path
from typing import Any

import pytest
from mailbroker import runtime
from mailbroker.integrations import IntegrationStore, parse_integration
from mailbroker.messages.mime import build_mime
from mailbroker.messages.models import parse_message

from tests.fixtures.events import context, http_event
from tests.fixtures.pipeline import MailPipeline, start_pipeline

EVENTS = Path(__file__).resolve().parents[2] / "events"
SENDER = "support@contoso.com"
CLIENT_SECRET = "planted-client-secret-e2e-4d1f"


class Stack:
    """The deployed stack as an application sees it: the HTTP API, and the sender fed by the
    shared pipeline harness as the event source mapping feeds it."""

    def __init__(self, pipeline: MailPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        stack, smtp, tokens = pipeline.stack, pipeline.smtp, pipeline.tokens
        self.pipeline = pipeline
        self.stack = stack
        self.monkeypatch = monkeypatch
        self.smtp = smtp
        self.sqs = pipeline.sqs
        self.queue_url = pipeline.queue_url
        # Both functions' environments: they name the same tables and queues.
        for logical_id in ("TokenBrokerFunction", "SenderFunction"):
            for name, value in stack.function_env(logical_id).items():
                monkeypatch.setenv(name, value)
        runtime.reset()
        self.integration = f"support-{uuid.uuid4().hex[:8]}"
        tokens.register_microsoft_app("contoso", f"app-{self.integration}", CLIENT_SECRET)
        store = IntegrationStore(
            stack.client("secretsmanager"), stack.function_env("SenderFunction")["SECRET_PREFIX"]
        )
        store.put(
            parse_integration(
                {
                    "id": self.integration,
                    "provider": "microsoft",
                    "smtp": {"host": "127.0.0.1", "port": smtp.port, "security": "starttls"},
                    "username": SENDER,
                    "senders": [{"email": SENDER, "name": "Support Team"}],
                    "tenant_id": "contoso",
                    "client_id": f"app-{self.integration}",
                    "client_secret": CLIENT_SECRET,
                    "authority": tokens.base_url,
                }
            )
        )
        smtp.add_mailbox(SENDER)

    def message(self, **overrides: Any) -> dict[str, Any]:
        body = json.loads((EVENTS / "message.json").read_text())
        body |= {"integration": self.integration, "id": f"order-{uuid.uuid4().hex[:10]}", **overrides}
        return {k: v for k, v in body.items() if v is not None}

    def post(self, body: dict[str, Any] | str) -> tuple[int, dict[str, Any]]:
        return self._api(http_event("POST /v1/messages", body=body))

    def get(self, message_id: str) -> tuple[int, dict[str, Any]]:
        return self._api(http_event("GET /v1/messages/{id}", path_parameters={"id": message_id}))

    def _api(self, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        from token_broker.app import lambda_handler

        answer = lambda_handler(event, context("TokenBrokerFunction"))
        return answer["statusCode"], json.loads(answer["body"])

    def run_sender(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The event source mapping: receive a batch, invoke the sender, delete what it finished."""
        event = self.pipeline.receive()
        self.pipeline.run(event)
        return self.pipeline.last_answer, event["Records"]

    def queued(self) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"])


@pytest.fixture
def deployed(
    stack: Any,
    aws_env: dict[str, str],
    fresh_token_server: Any,
    ca_trust_env: dict[str, str],
    smtp_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Stack]:
    pipeline = start_pipeline(
        stack, fresh_token_server, smtp_server, monkeypatch, token_timeout=None, gate_tokens=False
    )
    deployed = Stack(pipeline, monkeypatch)
    yield deployed
    pipeline.drain()
    runtime.reset()


def test_a_posted_message_is_sent_and_its_status_says_so(deployed: Stack) -> None:
    message = deployed.message()

    posted = deployed.post(message)
    while_queued = deployed.get(message["id"])
    answer, [record] = deployed.run_sender()
    after = deployed.get(message["id"])

    assert posted == (202, {"id": message["id"], "status": "queued"})
    assert while_queued[0] == 200 and while_queued[1]["status"] == "queued"
    assert answer == {"batchItemFailures": []}
    [accepted] = deployed.smtp.accepted
    queued_at = dt.datetime.fromtimestamp(int(record["attributes"]["SentTimestamp"]) / 1000, dt.UTC)
    expected = build_mime(parse_message(json.dumps(message)), message_id_domain="contoso.com", now=queued_at)
    assert accepted.data == expected.as_bytes()
    assert accepted.mechanism == "XOAUTH2"
    status, body = after
    assert status == 200
    assert body["status"] == "sent"
    assert body["reply"] == f"250 2.0.0 OK <{accepted.queue_id}>"
    assert body["integration"] == deployed.integration
    assert deployed.queued() == 0


def test_posting_the_same_id_again_queues_nothing_and_answers_its_current_status(deployed: Stack) -> None:
    message = deployed.message()

    first = deployed.post(message)
    second = deployed.post(message)
    queued_after_two_posts = deployed.queued()
    deployed.run_sender()
    after_sending = deployed.post(message)

    assert first[1]["status"] == second[1]["status"] == "queued"
    assert queued_after_two_posts == 1
    assert after_sending == (202, {"id": message["id"], "status": "sent"})
    assert deployed.queued() == 0
    assert len(deployed.smtp.accepted) == 1


def test_a_post_without_id_is_given_one_and_tracked_under_it(deployed: Stack) -> None:
    status, body = deployed.post(deployed.message(id=None))
    deployed.run_sender()

    assert status == 202
    assert deployed.get(body["id"])[1]["status"] == "sent"


def test_an_invalid_post_answers_400_with_every_field_error_and_queues_nothing(deployed: Stack) -> None:
    message = deployed.message(to=[], subject="two\r\nlines", headers={"From": "spoof@example.com"})

    status, body = deployed.post(message)

    assert status == 400
    assert body["error"]["code"] == "invalid_message"
    fields = {detail["field"] for detail in body["error"]["details"]}
    assert {"to", "subject", "headers.From"} <= fields
    assert deployed.queued() == 0
    assert deployed.get(message["id"])[0] == 404


def test_a_post_the_queue_cannot_carry_answers_400(deployed: Stack) -> None:
    big = base64.b64encode(b"\0" * 200_000).decode()
    message = deployed.message(
        attachments=[{"filename": "big.bin", "content_type": "application/octet-stream", "content": big}]
    )

    status, body = deployed.post(message)

    assert status == 400
    assert body["error"]["code"] == "invalid_message"
    assert deployed.queued() == 0


def test_a_post_from_a_sender_the_integration_does_not_allow_answers_403(deployed: Stack) -> None:
    status, body = deployed.post(deployed.message(**{"from": {"email": "ceo@contoso.com"}}))

    assert status == 403
    assert body["error"]["code"] == "sender_not_allowed"
    assert deployed.queued() == 0


def test_an_unknown_message_id_answers_404_not_found(deployed: Stack) -> None:
    status, body = deployed.get(f"never-posted-{uuid.uuid4().hex[:6]}")

    assert status == 404
    assert body["error"]["code"] == "not_found"


# --- POST /v1/integrations/{id}/test ------------------------------------------------------------------


def test_the_test_route_delivers_a_labelled_mail_from_the_default_sender(deployed: Stack) -> None:
    # events/http_post_test.json's shape, for this integration
    event = http_event(
        "POST /v1/integrations/{id}/test",
        path_parameters={"id": deployed.integration},
        body={"to": "ana@example.com"},
    )

    status, body = deployed._api(event)
    answer, _ = deployed.run_sender()
    after = deployed.get(body["id"])

    assert status == 202 and body == {"id": body["id"], "status": "queued"}
    assert body["id"].startswith(f"test-{deployed.integration}-")
    assert answer == {"batchItemFailures": []}
    [accepted] = deployed.smtp.accepted
    assert (accepted.mail_from, accepted.rcpt_tos, accepted.mechanism) == (
        SENDER,
        ["ana@example.com"],
        "XOAUTH2",
    )
    mail = email.message_from_bytes(accepted.data, policy=policy.default)
    assert mail["From"] == f"Support Team <{SENDER}>"
    assert mail["Subject"] == f"mailbroker test message ({deployed.integration})"
    assert mail["X-Mailbroker-Test"] == "1"
    assert "This is a test message from mailbroker" in mail.get_content()
    assert after[0] == 200 and after[1]["status"] == "sent"
    assert after[1]["reply"] == f"250 2.0.0 OK <{accepted.queue_id}>"


def test_the_test_route_answers_404_unknown_integration_and_queues_nothing(deployed: Stack) -> None:
    event = http_event(
        "POST /v1/integrations/{id}/test", path_parameters={"id": "nobody"}, body={"to": "ana@example.com"}
    )

    status, body = deployed._api(event)

    assert status == 404
    assert body["error"]["code"] == "unknown_integration"
    assert "mailbroker integration add" in body["error"]["hint"]
    assert deployed.queued() == 0


def test_the_test_route_refuses_a_bad_address_with_400_and_queues_nothing(deployed: Stack) -> None:
    event = http_event(
        "POST /v1/integrations/{id}/test",
        path_parameters={"id": deployed.integration},
        body={"to": "not an address"},
    )

    status, body = deployed._api(event)

    assert status == 400
    assert body["error"]["code"] == "invalid_message"
    assert [d["field"] for d in body["error"]["details"]] == ["to[0].email"]
    assert deployed.queued() == 0
