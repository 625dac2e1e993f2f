"""The loopback world the figures run in: the sandbox CA, token endpoints, moto server with the
stack provisioned from ``template.yaml``, SMTP servers and the Graph / Gmail API stand-ins. Each
piece starts on first use and stops when the run ends."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mailbroker_sandbox.events import LambdaContext, sqs_event

__all__ = ["LambdaContext", "sqs_records"]  # the Lambda context is the sandbox's, shared by all

ROOT = Path(__file__).resolve().parents[1]


class Sandbox:
    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._ca: Any = None
        self._moto: Any = None
        self._aws: Any = None
        self._tokens: Any = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    @property
    def ca(self) -> Any:
        if self._ca is None:
            from mailbroker_sandbox.ca import create_ca

            directory = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="mailbroker-bench-"))
            self._ca = create_ca(directory)
        return self._ca

    def token_server(self, *, lifetime: float = 3600.0) -> Any:
        """A new started token endpoint server, stopped at the end of the run."""
        from mailbroker_sandbox.token_server import TokenServer

        server = TokenServer(self.ca, lifetime=lifetime).start()
        self._stack.callback(server.stop)
        return server

    @property
    def tokens(self) -> Any:
        """The token endpoints the SMTP servers verify XOAUTH2 tokens against."""
        if self._tokens is None:
            self._tokens = self.token_server()
        return self._tokens

    def smtp_server(self, **options: Any) -> Any:
        """A new started sandbox SMTP server (STARTTLS, XOAUTH2 verified against ``tokens``)."""
        from mailbroker_sandbox.smtp_server import SandboxSmtpServer

        server = SandboxSmtpServer(self.ca, verify_token=self.tokens.introspect, **options).start()
        self._stack.callback(server.stop)
        return server

    def mail_api_server(self) -> Any:
        """A new started Graph / Gmail API stand-in (HTTPS; tokens verified against ``tokens``)."""
        from mailbroker_sandbox.mail_apis import MailApiServer

        server = MailApiServer(self.ca, verify_token=self.tokens.introspect).start()
        self._stack.callback(server.stop)
        return server

    def microsoft_identity(self, name: str, smtp_server: Any) -> dict[str, Any]:
        """An integration's secret JSON for a new app and mailbox: the app registered at ``tokens``,
        the mailbox at ``smtp_server``, which it reaches over STARTTLS."""
        tenant = "bench-tenant"
        secret = f"bench-secret-{name}"
        mailbox = f"{name}@contoso.example"
        self.tokens.register_microsoft_app(tenant, f"app-{name}", secret)
        smtp_server.add_mailbox(mailbox, allowed_clients=[f"app-{name}"])
        return {
            "id": name,
            "provider": "microsoft",
            "smtp": {"host": "127.0.0.1", "port": smtp_server.port, "security": "starttls"},
            "username": mailbox,
            "senders": [{"email": mailbox}],
            "tenant_id": tenant,
            "client_id": f"app-{name}",
            "client_secret": secret,
            "authority": self.tokens.base_url,
        }

    @property
    def aws(self) -> Any:
        """The stack provisioned from template.yaml on a moto server."""
        if self._aws is None:
            from mailbroker_sandbox.aws import MotoServer, load_template, provision

            self._moto = MotoServer().start()
            self._stack.callback(self._moto.stop)
            self._aws = provision(load_template(ROOT / "template.yaml"), endpoint_url=self._moto.endpoint_url)
        return self._aws

    def aws_env(self) -> dict[str, str]:
        self.aws  # noqa: B018 - starts the server
        return self._moto.env()

    def function_env(self, logical_id: str, **extra: str) -> dict[str, str]:
        """What the function's process would see: the template's variables for it, boto3 pointed at
        moto, the sandbox CA trusted, logs at WARNING so they stay out of the table. Metrics stay on
        (their output is discarded): building them is part of the work."""
        return {
            **self.aws.function_env(logical_id),
            **self.aws_env(),
            **self.ca.trust_env(),
            "POWERTOOLS_LOG_LEVEL": "WARNING",
            **extra,
        }


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block, restoring the previous ones afterwards, and make
    the runtime forget clients built under other settings."""
    from mailbroker import runtime

    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    runtime.reset()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        runtime.reset()


def handler(function: str) -> Any:
    """``functions/<function>/app.py``'s ``lambda_handler``, imported as ``<function>.app`` (as the
    tests do)."""
    import importlib
    import sys

    functions = str(ROOT / "functions")
    if functions not in sys.path:
        sys.path.insert(0, functions)
    return importlib.import_module(f"{function}.app").lambda_handler


def sqs_records(messages: list[dict[str, Any]], queue_arn: str) -> list[dict[str, Any]]:
    """SQS ``ReceiveMessage`` results (``AttributeNames=["All"]``) as the records of the event
    Lambda's SQS event source hands the sender."""
    return sqs_event(messages, queue_arn)["Records"]


def outgoing(
    integration: dict[str, Any], message_id: str, recipient: str = "ana@example.com"
) -> dict[str, Any]:
    """A queued message (docs/design.md, "Messages") from the integration's mailbox to one recipient."""
    return {
        "integration": integration["id"],
        "id": message_id,
        "usage": "transactional",
        "from": {"email": integration["username"], "name": "Support Team"},
        "to": [recipient],
        "subject": f"Your order {message_id} shipped",
        "text": "Your order is on its way.\n" * 20,
        "html": "<p>Your order is on its way.</p>" * 20,
    }
