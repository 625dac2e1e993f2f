"""No credential leaves mailbroker in anything an operator or attacker can read.

Unique values are planted for every kind of credential — Microsoft, Google and OAuth2 client
secrets, a Google refresh token, a service account's private key, SMTP passwords — and the access
tokens the sandbox issues are collected as they are used. Then every flow runs with
``POWERTOOLS_LOG_LEVEL=DEBUG``: the token broker by direct invoke and over its HTTP API (successes
and every kind of failure), the sender on batches that succeed, refresh, retry and fail, the keeper,
and the CLI's ``integration show|list`` and ``doctor``. Everything they leave behind is searched
for every planted value in each form it could take (as is, base64, base64url, JSON-escaped,
URL-encoded, a slice of it, and the XOAUTH2 string built from each token): every log record with
all its fields (mailbroker's loggers and the OAuth libraries' — MSAL, google-auth, requests,
urllib3 — at DEBUG, the rest at their defaults), stdout and stderr (metrics included), status
records and every other DynamoDB item, dead-letter attributes, HTTP and direct-invoke error
bodies, exception messages and reprs, and CLI output.

botocore's own DEBUG logging (off unless a deployment turns it on) prints whole AWS responses,
GetSecretValue's included: it is not enabled here, and must not be in production.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from mailbroker import runtime
from mailbroker.integrations import IntegrationStore, parse_integration
from mailbroker.smtp.xoauth2 import xoauth2_initial_response

from mailbroker_sandbox.aws import provision
from mailbroker_sandbox.local import powertools_from_env
from mailbroker_sandbox.smtp_server import SandboxSmtpServer
from tests.fixtures.events import LambdaContext, http_event, sample
from tests.fixtures.pipeline import MailPipeline, TokenGate

TOKEN = "POST /v1/integrations/{id}/token"
HEALTH = "GET /v1/integrations/{id}/health"
CHECK = "POST /v1/integrations/{id}/check"
POST_MESSAGE = "POST /v1/messages"
GET_MESSAGE = "GET /v1/messages/{id}"
SENDER = "support@contoso.com"
DEBUG_LOGGERS = ("mailbroker", "msal", "google.auth", "google.oauth2", "urllib3", "requests", "oauthlib")


def planted(kind: str) -> str:
    return f"planted-{kind}-{secrets.token_urlsafe(24)}"


# ---------------------------------------------------------------- what is searched, and how


@dataclass
class Credentials:
    """Every credential value of the run, by kind."""

    values: dict[str, set[str]] = field(default_factory=dict)

    def add(self, kind: str, value: str) -> None:
        self.values.setdefault(kind, set()).add(value)

    def add_token(self, token: str, username: str) -> None:
        self.add("access token", token)
        self.add("XOAUTH2 string", xoauth2_initial_response(username, token))

    def add_private_key(self, pem: str) -> None:
        self.add("private key", pem)
        for line in pem.splitlines():
            if len(line) >= 40 and "PRIVATE KEY" not in line:
                self.add("private key line", line)


def forms(value: str) -> set[str]:
    """The ways a value could appear in text."""
    raw = value.encode()
    std, url = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    found = {value, std, url, std.rstrip("="), url.rstrip("="), json.dumps(value)[1:-1], quote_plus(value)}
    found.add(quote(value, safe=""))
    if len(value) >= 40:
        middle = len(value) // 2
        found.add(value[middle - 12 : middle + 12])
    return {f for f in found if len(f) >= 12}


def search(credentials: Credentials, sink: str, texts: list[str]) -> list[str]:
    """Every (kind of credential, form) found in ``texts``, described."""
    haystack = "\n".join(texts)
    findings = []
    for kind, values in credentials.values.items():
        for value in values:
            for form in forms(value):
                if form in haystack:
                    at = haystack.index(form)
                    context = haystack[max(0, at - 60) : at].replace(value, "<value>")
                    findings.append(f"{sink}: {kind} found after {context[-60:]!r}")
                    break
    return findings


class Recorder(logging.Handler):
    """Every record, with every field (message, arguments, extras, exception text)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []
        self.levels: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.levels.add(record.levelno)
        fields = dict(vars(record))
        if record.exc_info:
            fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
        fields["rendered"] = record.getMessage()
        self.records.append(json.dumps(fields, default=repr))


@dataclass
class Sinks:
    logs: list[str] = field(default_factory=list)
    stdio: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    status_records: list[str] = field(default_factory=list)
    dead_letters: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # HTTP and direct-invoke error answers
    exceptions: list[str] = field(default_factory=list)
    cli: list[str] = field(default_factory=list)
    log_levels: set[int] = field(default_factory=set)


@dataclass
class Run:
    credentials: Credentials
    sinks: Sinks
    tokens: Any
    servers: list[SandboxSmtpServer]
    gate: TokenGate
    invokes: list[dict[str, Any]]


# ---------------------------------------------------------------- the run


@contextlib.contextmanager
def everything_captured() -> Any:
    recorder = Recorder()
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in DEBUG_LOGGERS}
    from mailbroker.observability import logger as powertools_logger

    saved_powertools = powertools_logger.log_level
    root.addHandler(recorder)
    for name in DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    powertools_logger.setLevel("DEBUG")
    powertools_logger.addHandler(recorder)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield recorder, out, err
    finally:
        root.removeHandler(recorder)
        powertools_logger._logger.removeHandler(recorder)
        powertools_logger.setLevel(saved_powertools)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class Scene:
    """One stack, the sandbox's token endpoints and two SMTP servers, and an integration of every
    kind with planted credentials — some of them wrong on purpose."""

    def __init__(self, stack, tokens, ca, monkeypatch, credentials: Credentials) -> None:
        self.stack = stack
        self.tokens = tokens
        self.monkeypatch = monkeypatch
        self.credentials = credentials
        self.gate = TokenGate(tokens)
        self.smtp = SandboxSmtpServer(ca, verify_token=self.gate).start()
        self.gmail_gate = TokenGate(tokens)
        self.gmail = SandboxSmtpServer(ca, verify_token=self.gmail_gate, gmail_style=True).start()
        self.store = IntegrationStore(
            stack.client("secretsmanager"), stack.parameters["SecretPrefix"], max_age=0
        )
        self.uid = uuid.uuid4().hex[:6]
        self.ids: dict[str, str] = {}
        self.invokes: list[dict[str, Any]] = []

    def stop(self) -> None:
        self.smtp.stop()
        self.gmail.stop()

    def as_function(self, logical_id: str) -> dict[str, str]:
        env = self.stack.function_env(logical_id)
        for name, value in env.items():
            self.monkeypatch.setenv(name, value)
        self.monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "DEBUG")
        self.monkeypatch.setenv("TOKEN_HTTP_TIMEOUT_SECONDS", "1")
        # The sample events' caller may use the (closed by default) token route.
        self.monkeypatch.setenv("TOKEN_API_PRINCIPALS", "arn:aws:iam::123456789012:role/app-role")
        runtime.reset()
        powertools_from_env({**env, "POWERTOOLS_LOG_LEVEL": "DEBUG"})
        return env

    def add(self, name: str, provider: str, *, server: SandboxSmtpServer | None = None, **fields: Any) -> str:
        integration_id = f"{name}-{self.uid}"
        server = server or self.smtp
        document = {
            "id": integration_id,
            "provider": provider,
            "smtp": {"host": "127.0.0.1", "port": server.port, "timeout_seconds": 3},
            "username": SENDER,
            "senders": [{"email": SENDER}],
            "limits": {"messages_per_minute": 6000, "max_connections": 10},
            "smtp_check": True,
            **fields,
        }
        integration = parse_integration(document)
        self.store.put(integration)
        self.ids[name] = integration_id
        return integration_id

    def integrations(self) -> None:
        c, t = self.credentials, self.tokens
        self.smtp.add_mailbox(SENDER, password=(password := planted("smtp-password")))
        self.gmail.add_mailbox(SENDER)
        c.add("password", password)

        ms_secret, wrong_secret = planted("ms-secret"), planted("ms-wrong-secret")
        c.add("client secret", ms_secret)
        c.add("client secret", wrong_secret)
        t.register_microsoft_app("contoso", f"app-{self.uid}", ms_secret)
        microsoft = {"tenant_id": "contoso", "client_id": f"app-{self.uid}", "authority": t.base_url}
        self.add("m365", "microsoft", client_secret=ms_secret, **microsoft)
        self.add("m365-wrong-secret", "microsoft", client_secret=wrong_secret, **microsoft)

        for name, revoked in (("gmail", False), ("gmail-revoked", True)):
            client_secret = planted("google-secret")
            c.add("client secret", client_secret)
            t.register_google_client(f"g-{name}-{self.uid}", client_secret)
            refresh = t.issue_refresh_token(f"g-{name}-{self.uid}", SENDER)
            c.add("refresh token", refresh)
            if revoked:
                t.revoke_refresh_token(refresh)
            self.add(
                name,
                "google",
                server=self.gmail,
                client_id=f"g-{name}-{self.uid}",
                client_secret=client_secret,
                refresh_token=refresh,
                token_uri=t.google_token_uri,
            )

        key = t.register_service_account()
        c.add_private_key(key["private_key"])
        self.add(
            "workspace", "google_service_account", server=self.gmail, service_account_info=key, subject=SENDER
        )

        oauth2_secret = planted("oauth2-secret")
        c.add("client secret", oauth2_secret)
        t.register_oauth2_client(f"o-{self.uid}", oauth2_secret, scope="smtp.send")
        self.add(
            "oauth2",
            "oauth2",
            token_url=t.oauth2_token_url,
            client_id=f"o-{self.uid}",
            client_secret=oauth2_secret,
            scope="smtp.send",
        )

        c.add("password", wrong_password := planted("smtp-wrong-password"))
        self.add("relay", "basic", password=password)
        self.add("relay-wrong-password", "basic", password=wrong_password)

    # -- the token broker

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        from token_broker.app import lambda_handler

        answer = lambda_handler(event, LambdaContext("TokenBrokerFunction"))
        self.invokes.append(answer)
        return answer

    def token_broker(self, sinks: Sinks) -> None:
        self.as_function("TokenBrokerFunction")
        oauth = ["m365", "gmail", "workspace", "oauth2"]
        for name in [*oauth, "m365-wrong-secret", "gmail-revoked", "relay", "no-such-integration"]:
            answer = self.invoke({"integration": self.ids.get(name, name)})
            self.collect(answer, sinks)
        self.tokens.fail_next("500", path_contains="/oauth2/token")
        self.collect(self.invoke({"integration": self.ids["oauth2"], "force_refresh": True}), sinks)
        self.collect(self.invoke({"integration": self.ids["m365"], "force_refresh": True}), sinks)
        self.collect(self.invoke({"integration": 42, "force_refresh": "yes"}), sinks)

        routes = [
            (TOKEN, "m365", None),
            (TOKEN, "m365", '{"force_refresh": "maybe"}'),
            (TOKEN, "m365-wrong-secret", None),
            (TOKEN, "gmail-revoked", None),
            (TOKEN, "no-such-integration", None),
            (HEALTH, "m365", None),
            (CHECK, "m365", None),
            (CHECK, "relay", None),
            (CHECK, "relay-wrong-password", None),
            (CHECK, "gmail-revoked", None),
            (POST_MESSAGE, None, '{"integration": "x", "to": "bad\\r\\nBcc: x@y.z"}'),
            (POST_MESSAGE, None, "not json"),
            (GET_MESSAGE, None, None),
        ]
        for route, name, body in routes:
            parameters = {"id": self.ids.get(name, name)} if name else None
            event = http_event(route, path_parameters=parameters, **({} if body is None else {"body": body}))
            answer = self.invoke(event)
            self.collect(answer, sinks)

    def collect(self, answer: dict[str, Any], sinks: Sinks) -> None:
        """Tokens the broker handed out join the search; every failure answer is a sink."""
        body = answer
        if "statusCode" in answer:
            body = json.loads(answer.get("body") or "{}")
            if answer["statusCode"] >= 400:
                sinks.errors.append(json.dumps(answer))
        if isinstance(body, dict) and "access_token" in body:
            self.credentials.add_token(body["access_token"], SENDER)
        elif isinstance(body, dict) and ("error" in body or "steps" in body):
            sinks.errors.append(json.dumps(body))

    # -- the sender

    def sender(self, sinks: Sinks) -> None:
        env = self.as_function("SenderFunction")
        pipeline = MailPipeline(
            self.stack, env, self.tokens, self.smtp, self.gate, self.monkeypatch, lambda **_: self.smtp
        )
        pipeline.servers.append(self.gmail)
        for name in self.ids:
            message = pipeline.message(self.ids[name])
            pipeline.post(message)
        pipeline.post(pipeline.message(self.ids["m365"], to=["bad\r\nBcc: thief@evil.example"]))
        pipeline.post('{"id": "broken-json", "integration": ')
        self.smtp.fail("auth", 535, "5.7.3 Authentication unsuccessful")  # one forced refresh
        self.gmail_gate.refuse = 1  # Gmail's 334 JSON challenge, then a fresh token
        self.smtp.fail("mail", 451, "4.3.0 Mail server temporarily rejected message")
        pipeline.drive()
        sinks.dead_letters += list(pipeline.dead_letters().values())
        pipeline.drain()

    # -- the keeper

    def keeper(self) -> None:
        from keeper.app import lambda_handler

        self.as_function("KeeperFunction")
        lambda_handler(sample("schedule.json"), LambdaContext("KeeperFunction"))

    # -- the CLI

    def cli(self, sinks: Sinks) -> None:
        from mailbroker_cli.main import main

        self.as_function("KeeperFunction")
        self.monkeypatch.setenv("MAILBROKER_LOG_LEVEL", "DEBUG")
        commands = [["integration", "list"], ["integration", "list", "--json"]]
        for integration_id in self.ids.values():
            commands += [
                ["integration", "show", integration_id],
                ["integration", "show", integration_id, "--json"],
            ]
            commands += [["doctor", integration_id], ["doctor", integration_id, "--json"]]
        for command in commands:
            out, err = io.StringIO(), io.StringIO()
            with (
                contextlib.redirect_stdout(out),
                contextlib.redirect_stderr(err),
                contextlib.suppress(SystemExit),
            ):
                main(command)
            sinks.cli += [out.getvalue(), err.getvalue()]


def record_exceptions(monkeypatch: pytest.MonkeyPatch, sinks: Sinks) -> None:
    """Keep the message and repr of every exception a record's delivery raises (a retry, a
    failure) and of every classified error built, on its way through."""
    from mailbroker import errors
    from mailbroker.messages import delivery

    original = delivery.Delivery.handle_record

    def handle_record(self: Any, record: Any) -> str:
        try:
            return original(self, record)
        except Exception as exc:
            sinks.exceptions += [str(exc), repr(exc)]
            raise

    monkeypatch.setattr(delivery.Delivery, "handle_record", handle_record)
    init = errors.MailbrokerError.__init__

    def remembered(self: Any, message: str, **kwargs: Any) -> None:
        init(self, message, **kwargs)
        said = {"message": self.message, "details": self.details, "hint": self.hint}
        sinks.exceptions += [str(self), repr(self), json.dumps(said, default=repr)]

    monkeypatch.setattr(errors.MailbrokerError, "__init__", remembered)


def table_items(stack: Any) -> tuple[list[str], list[str]]:
    """Every item of both tables as text (binary attributes decoded byte for byte), and the
    status records among them."""
    dynamodb = stack.client("dynamodb")
    items, statuses = [], []
    for table in stack.table_names.values():
        for page in dynamodb.get_paginator("scan").paginate(TableName=table):
            for item in page["Items"]:
                text = json.dumps(item, default=lambda b: bytes(b).decode("latin-1"))
                items.append(text)
                if item["pk"]["S"].startswith("msg#"):
                    statuses.append(text)
    return items, statuses


@pytest.fixture(scope="module")
def run(moto_server, template, token_server_session, sandbox_ca) -> Any:
    credentials, sinks = Credentials(), Sinks()
    tokens = token_server_session
    tokens.clear_faults()
    with pytest.MonkeyPatch.context() as monkeypatch, everything_captured() as (recorder, out, err):
        for name, value in {**moto_server.env(), **sandbox_ca.trust_env()}.items():
            monkeypatch.setenv(name, value)
        stack = provision(template, endpoint_url=moto_server.endpoint_url)
        scene = Scene(stack, tokens, sandbox_ca, monkeypatch, credentials)
        record_exceptions(monkeypatch, sinks)
        try:
            scene.integrations()
            for integration_id in scene.ids.values():
                sinks.exceptions.append(repr(scene.store.get(integration_id)))
            scene.token_broker(sinks)
            scene.sender(sinks)
            scene.keeper()
            scene.cli(sinks)
            for token in scene.gate.presented + scene.gmail_gate.presented:  # every token shown to SMTP
                credentials.add_token(token, SENDER)
            sinks.items, sinks.status_records = table_items(stack)
        finally:
            scene.stop()
            tokens.clear_faults()
            runtime.reset()
    sinks.logs = recorder.records
    sinks.log_levels = recorder.levels
    sinks.stdio = [out.getvalue(), err.getvalue()]
    yield Run(credentials, sinks, tokens, [scene.smtp, scene.gmail], scene.gate, scene.invokes)
    stack.delete()


# ---------------------------------------------------------------- the searches


def test_the_search_finds_a_planted_value_in_every_form_it_looks_for():
    credentials = Credentials()
    token = planted("token")
    credentials.add_token(token, SENDER)
    xoauth2 = base64.b64encode(xoauth2_initial_response(SENDER, token).encode()).decode()

    for leaked in [token, base64.b64encode(token.encode()).decode(), xoauth2, quote_plus(token)]:
        assert search(credentials, "probe", [f"AUTH XOAUTH2 {leaked}"]), leaked
    assert search(credentials, "probe", ["nothing to see"]) == []


def test_every_flow_ran_with_the_planted_credentials(run):
    kinds = run.credentials.values
    assert {
        "client secret",
        "refresh token",
        "private key",
        "password",
        "access token",
        "XOAUTH2 string",
    } <= set(kinds)
    assert len(kinds["access token"]) >= 5  # Microsoft, Gmail, Workspace, OAuth2, and a refresh
    assert sum(len(server.accepted) for server in run.servers) >= 5
    codes = {letter.get("error_code") for letter in run.sinks.dead_letters}
    assert {"token_invalid_client", "token_invalid_grant", "smtp_auth_failed", "invalid_message"} <= codes
    assert logging.DEBUG in run.sinks.log_levels, "DEBUG records were not produced"
    assert len(run.sinks.errors) >= 8 and run.sinks.cli and run.sinks.status_records


def test_no_credential_in_any_log_record_at_debug(run):
    assert search(run.credentials, "log", run.sinks.logs) == []


def test_no_credential_on_stdout_or_stderr_metrics_included(run):
    assert search(run.credentials, "stdout/stderr", run.sinks.stdio) == []


def test_no_credential_in_status_records(run):
    assert search(run.credentials, "status record", run.sinks.status_records) == []


def test_no_usable_credential_in_any_table_item(run):
    assert search(run.credentials, "DynamoDB item", run.sinks.items) == []


def test_no_credential_in_dead_letter_attributes(run):
    attributes = [
        json.dumps({k: v for k, v in letter.items() if k != "body"}) for letter in run.sinks.dead_letters
    ]
    assert search(run.credentials, "dead-letter attribute", attributes) == []


def test_no_credential_in_http_or_direct_invoke_error_answers(run):
    assert search(run.credentials, "error answer", run.sinks.errors) == []


def test_no_credential_in_exception_messages_or_reprs(run):
    assert search(run.credentials, "exception", run.sinks.exceptions) == []


def test_no_credential_in_cli_output(run):
    assert search(run.credentials, "CLI", run.sinks.cli) == []
