"""The whole stack on one machine: moto server, the sandbox token endpoints and SMTP server, the
template's resources, and the three functions driven the way AWS drives them.

``Sandbox`` starts the servers on free loopback ports, provisions ``template.yaml`` on moto and
sets the functions' environment from the template (boto3's ``AWS_ENDPOINT_URL`` points every
client at moto; ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE`` trust the sandbox CA). ``invoke`` calls
a function's ``lambda_handler`` with a Lambda-shaped context; ``http`` turns a request into the
API Gateway HTTP API (payload v2) event the token broker receives; ``QueuePoller`` is the SQS
event source mapping of the sender. ``make run`` (``sandbox/run.py``) uses them once;
``mailbroker local`` (``serve``) keeps them up, with the HTTP API on a loopback port.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from mailbroker_sandbox.checkout import repo_root
from mailbroker_sandbox.events import LambdaContext, http_event, schedule_event, sqs_record

if TYPE_CHECKING:
    from mailbroker.integrations import IntegrationStore

FUNCTIONS = {
    "token_broker": "TokenBrokerFunction",
    "sender": "SenderFunction",
    "keeper": "KeeperFunction",
    "event_publisher": "EventPublisherFunction",
    "tracking": "TrackingFunction",
}


# The sandbox's keyless audiences: Entra's, and a Google workload identity pool provider's.
SANDBOX_GOOGLE_PROVIDER = (
    "//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/mailbroker/providers/aws"
)
KEYLESS_AUDIENCES = f"api://AzureADTokenExchange,https:{SANDBOX_GOOGLE_PROVIDER}"


@dataclass(frozen=True)
class Demo:
    """One demo integration: what it is and how the sandbox stands in for its provider."""

    id: str
    provider: str
    mailbox: str
    auth: str
    note: str = ""
    transport: str = "smtp"


SANDBOX_CALLER = "arn:aws:iam::123456789012:user/sandbox"  # who the local HTTP API says calls


class Sandbox:
    """Servers, stack and function environments. Use as a context manager."""

    def __init__(
        self,
        *,
        template: str | Path | None = None,
        token_lifetime: float = 3600.0,
        parameters: Mapping[str, Any] | None = None,
        stack_name: str = "mailbroker",
        log: TextIO | None = None,
    ) -> None:
        self.root = repo_root()
        self.template_path = Path(template) if template else self.root / "template.yaml"
        self.token_lifetime = token_lifetime
        # The local HTTP API signs every request as SANDBOX_CALLER: the stack names it on the
        # token route (closed to everyone else by default), as an operator would name theirs.
        self.parameters = {"TokenApiPrincipals": SANDBOX_CALLER, **dict(parameters or {})}
        self.stack_name = stack_name
        self.log = log
        # Created by start(), removed by stop(): the CA's keys and, for ``serve``, the function log.
        self.workdir = Path()
        self.ca: Any = None
        self.moto: Any = None
        self.tokens: Any = None
        self.web_identity: Any = None  # AWS outbound identity federation (STS GetWebIdentityToken)
        self.google_federation: Any = None  # Google's STS and IAM Credentials
        self.smtp: Any = None
        self.mail_apis: Any = None
        self.stack: Any = None
        self.env: dict[str, str] = {}
        self._saved_env: dict[str, str | None] = {}
        self._handlers: dict[str, Any] = {}
        self._invoke_lock = threading.Lock()
        self._alert_queue_url = ""
        # The Google stand-in's OAuth client, as Google's client JSON (set by register_demo).
        self.google_client: dict[str, Any] | None = None
        # The queue the template's optional delivery-events rule targets (EventsTargetArn).
        self.events_queue_url = ""

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Sandbox:
        from mailbroker_sandbox.aws import MotoServer, load_template, provision
        from mailbroker_sandbox.ca import create_ca
        from mailbroker_sandbox.google_federation import GoogleFederation
        from mailbroker_sandbox.mail_apis import MailApiServer
        from mailbroker_sandbox.smtp_server import HttpIntrospector, SandboxSmtpServer
        from mailbroker_sandbox.token_server import TokenServer
        from mailbroker_sandbox.web_identity import WebIdentityIssuer

        try:
            self.workdir = Path(tempfile.mkdtemp(prefix="mailbroker-sandbox-"))
            self.ca = create_ca(self.workdir / "ca")
            self.moto = MotoServer().start()
            self.tokens = TokenServer(self.ca, lifetime=self.token_lifetime).start()
            self.web_identity = WebIdentityIssuer(self.ca).start()
            self.google_federation = GoogleFederation(self.ca, self.tokens).start()
            self.smtp = SandboxSmtpServer(
                self.ca,
                verify_token=HttpIntrospector(self.tokens.introspection_url, str(self.ca.ca_cert)),
                hostname="smtp.sandbox.example",
            ).start()
            # Graph sendMail and Gmail messages.send, accepting only tokens the endpoints above issued.
            self.mail_apis = MailApiServer(
                self.ca, verify_token=HttpIntrospector(self.tokens.introspection_url, str(self.ca.ca_cert))
            ).start()
            parameters = {**self._events_target(), "KeylessAudiences": KEYLESS_AUDIENCES, **self.parameters}
            # The IAM condition on sts:GetWebIdentityToken, as the template grants it.
            self.web_identity.allowed_audiences = set(filter(None, parameters["KeylessAudiences"].split(",")))
            self.stack = provision(
                load_template(self.template_path),
                endpoint_url=self.moto.endpoint_url,
                parameters=parameters,
                stack_name=self.stack_name,
            )
            self.activate()
        except BaseException:
            self.stop()
            raise
        return self

    def _events_target(self) -> dict[str, str]:
        """An operator's queue for delivery events, given to the template as its rule's target."""
        from mailbroker_sandbox.aws import aws_environment

        if "EventsTargetArn" in self.parameters:
            return {}
        import boto3

        env = aws_environment(self.moto.endpoint_url)
        sqs = boto3.client(
            "sqs",
            endpoint_url=self.moto.endpoint_url,
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        self.events_queue_url = sqs.create_queue(QueueName=f"{self.stack_name}-delivery-events")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self.events_queue_url, AttributeNames=["QueueArn"])
        return {"EventsTargetArn": arn["Attributes"]["QueueArn"], "EventsTargetKind": "sqs"}

    def stop(self) -> None:
        for server in (
            self.mail_apis,
            self.smtp,
            self.google_federation,
            self.web_identity,
            self.tokens,
            self.moto,
        ):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        self.mail_apis = self.smtp = self.tokens = self.moto = None
        self.web_identity = self.google_federation = None
        if self.workdir.name.startswith("mailbroker-sandbox-"):
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = Path()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()
        from mailbroker import runtime

        runtime.reset()

    # --- the functions' environment -----------------------------------------------------------------

    def function_env(self, function: str) -> dict[str, str]:
        """One function's environment as the template sets it, plus the sandbox's AWS endpoint and
        CA trust (what a deployed function gets from Lambda and the system trust store)."""
        return {
            **self.moto.env(),
            **self.ca.trust_env(),
            **self.web_identity.environment(),  # STS GetWebIdentityToken (moto has none)
            **self.stack.function_env(FUNCTIONS[function]),
        }

    def activate(self) -> dict[str, str]:
        """Set this process's environment to the union of the three functions' environments (they
        agree on every shared name, which is checked) and forget clients built before."""
        union: dict[str, str] = {}
        for function in FUNCTIONS:
            for name, value in self.function_env(function).items():
                if union.setdefault(name, value) != value:
                    raise RuntimeError(f"template gives {name} different values in different functions")
        for name, value in union.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            if name in os.environ:
                self._saved_env.setdefault(name, os.environ[name])
                del os.environ[name]
        from mailbroker import runtime

        runtime.reset()
        powertools_from_env(union)
        self.env = union
        return union

    def client(self, service: str) -> Any:
        return self.stack.client(service)

    @property
    def integrations(self) -> IntegrationStore:
        from mailbroker import runtime
        from mailbroker.settings import SecretsEnv

        return runtime.build_integration_store(SecretsEnv.from_env(self.env), max_age=0)

    # --- invoking functions -----------------------------------------------------------------------

    def handler(self, function: str) -> Any:
        """The function's ``lambda_handler``, loaded from functions/<name>/app.py."""
        if function not in self._handlers:
            path = self.root / "functions" / function / "app.py"
            spec = importlib.util.spec_from_file_location(f"mailbroker_sandbox_{function}_app", path)
            if spec is None or spec.loader is None:
                raise FileNotFoundError(path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._handlers[function] = module.lambda_handler
        return self._handlers[function]

    def context(self, function: str) -> LambdaContext:
        settings = self.stack.function_settings(FUNCTIONS[function])
        name = self.stack.resources[FUNCTIONS[function]]
        return LambdaContext(
            function_name=name,
            memory_limit_in_mb=int(settings["memory_size"]),
            timeout_seconds=int(settings["timeout"]),
            invoked_function_arn=self.stack.attribute(FUNCTIONS[function], "Arn"),
            log_group_name=f"/aws/lambda/{name}",
        )

    def invoke(self, function: str, event: Any) -> Any:
        """One invocation, as Lambda would run it (one at a time per environment). Function logs
        and metrics (JSON on stdout in Lambda) go to ``log`` when one was given."""
        handler = self.handler(function)
        with self._invoke_lock, self._capture_output():
            return handler(event, self.context(function))

    @contextlib.contextmanager
    def _capture_output(self) -> Iterator[None]:
        if self.log is None:
            yield
            return
        from mailbroker.observability import logger

        handler = logger.registered_handler
        stream_handler = handler if isinstance(handler, logging.StreamHandler) else None
        previous = stream_handler.setStream(self.log) if stream_handler else None
        try:
            with contextlib.redirect_stdout(self.log):
                yield
        finally:
            if stream_handler is not None and previous is not None:
                stream_handler.setStream(previous)

    def stream_poller(self) -> Any:
        """The event publisher's DynamoDB stream event source mappings, reading from now on."""
        from mailbroker_sandbox.streams import StreamPoller

        settings = self.stack.function_settings(FUNCTIONS["event_publisher"])
        return StreamPoller(self, "event_publisher", settings, self.client)

    def delivery_events(self, *, wait_seconds: int = 0) -> list[dict[str, Any]]:
        """The delivery events the template's rule delivered to the sandbox's queue since the last call."""
        from mailbroker_sandbox.streams import EventInbox

        if not self.events_queue_url:
            return []
        return EventInbox(self.client("sqs"), self.events_queue_url).take(wait_seconds=wait_seconds)

    def http(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """A request to the HTTP API, as API Gateway hands it to the function that serves the
        route (payload v2). Answers (status, headers, body parsed as JSON when it is JSON; the
        bytes of a base64 body that is not text)."""
        event = api_gateway_event(method, path, body, headers, self.stack.http_routes, self.stack.region)
        answer = self.invoke(self.route_function(event["routeKey"]), event)
        raw = answer.get("body") or ""
        if answer.get("isBase64Encoded") and not str(
            answer.get("headers", {}).get("Content-Type", "")
        ).startswith(("application/json", "text/")):
            return (
                int(answer.get("statusCode", 200)),
                dict(answer.get("headers") or {}),
                base64.b64decode(raw),
            )
        if answer.get("isBase64Encoded"):
            raw = base64.b64decode(raw).decode("utf-8", "replace")
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return int(answer.get("statusCode", 200)), dict(answer.get("headers") or {}), parsed

    def route_function(self, route_key: str) -> str:
        """The function (a key of FUNCTIONS) that serves ``route_key``; the token broker answers
        routes nobody declares, as API Gateway's $default would not exist."""
        by_logical_id = {logical_id: name for name, logical_id in FUNCTIONS.items()}
        for route in self.stack.http_routes:
            if f"{route['method']} {route['path']}" == route_key:
                return by_logical_id[route["function"]]
        return "token_broker"

    # --- operators' view ----------------------------------------------------------------------------

    def subscribe_alerts(self) -> str:
        """An SQS queue subscribed to the alert topic (standing in for an operator's e-mail)."""
        if not self._alert_queue_url:
            sqs = self.client("sqs")
            url = sqs.create_queue(QueueName=f"{self.stack.name}-operator-inbox")["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
                "QueueArn"
            ]
            self.client("sns").subscribe(TopicArn=self.env["ALERT_TOPIC_ARN"], Protocol="sqs", Endpoint=arn)
            self._alert_queue_url = url
        return self._alert_queue_url

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts delivered to the operator queue so far (consumed)."""
        sqs = self.client("sqs")
        found: list[dict[str, Any]] = []
        while True:
            batch = sqs.receive_message(
                QueueUrl=self.subscribe_alerts(), MaxNumberOfMessages=10, WaitTimeSeconds=0
            ).get("Messages", [])
            if not batch:
                return found
            for message in batch:
                envelope = json.loads(message["Body"])
                attributes = {k: v.get("Value") for k, v in (envelope.get("MessageAttributes") or {}).items()}
                found.append(
                    {"subject": envelope.get("Subject"), "message": envelope.get("Message"), **attributes}
                )
                sqs.delete_message(QueueUrl=self._alert_queue_url, ReceiptHandle=message["ReceiptHandle"])

    # --- demo integrations --------------------------------------------------------------------------

    def register_demo(self) -> list[Demo]:
        """One integration per provider type, each backed by the sandbox's stand-in for its
        provider, plus a Gmail integration whose user has revoked access, and the HTTP transports:
        Graph sendMail (one mailbox outside the app's application access policy) and the Gmail API."""
        from mailbroker.integrations import parse_integration

        tokens, smtp = self.tokens, self.smtp
        smtp_endpoint = {
            "host": "127.0.0.1",
            "port": smtp.port,
            "security": "starttls",
            "timeout_seconds": 10,
        }
        store = self.integrations
        demos: list[Demo] = []

        def add(document: dict[str, Any], demo: Demo) -> None:
            store.put(parse_integration({"smtp": smtp_endpoint, **document}))
            demos.append(demo)

        # Microsoft 365: an Entra app with SMTP.SendAsApp, whose secret expires in 20 days.
        tenant, app = str(uuid.uuid4()), str(uuid.uuid4())
        secret = _secret()
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=20)
        tokens.register_microsoft_app(tenant, app, secret)
        smtp.add_mailbox("support@contoso.com", allowed_clients=[app])
        add(
            {
                "id": "support-m365",
                "provider": "microsoft",
                "username": "support@contoso.com",
                "senders": [
                    {"email": "support@contoso.com", "name": "Contoso Support"},
                    {"email": "billing@contoso.com", "name": "Contoso Billing"},
                ],
                "tenant_id": tenant,
                "client_id": app,
                "client_secret": secret,
                "authority": tokens.microsoft_authority(),
                "client_secret_expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "smtp_check": True,
            },
            Demo(
                "support-m365",
                "microsoft",
                "support@contoso.com",
                "MSAL client credentials",
                "no SendAs on billing@; secret expires in 20 days",
            ),
        )
        self._register_graph_demos(tenant, secret, add)
        self._register_microsoft_credential_demos(tenant, add)
        self._register_keyless_microsoft_demo(tenant, add)
        # Gmail: an OAuth client and a user's refresh token.
        client_id = f"{secrets.randbelow(10**12)}-sandbox.apps.googleusercontent.com"
        client_secret = "GOCSPX-" + _secret()
        tokens.register_google_client(client_id, client_secret)
        self.google_client = {
            "installed": {
                "client_id": client_id,
                "client_secret": client_secret,
                "auth_uri": tokens.authorization_url,
                "token_uri": tokens.google_token_uri,
                "redirect_uris": ["http://localhost"],
            }
        }
        refresh = tokens.issue_refresh_token(client_id, "ana@gmail.example")
        smtp.add_mailbox("ana@gmail.example")
        add(
            {
                "id": "support-gmail",
                "provider": "google",
                "username": "ana@gmail.example",
                "client_id": client_id,
                "client_secret": client_secret,
                "refresh_token": refresh,
                "token_uri": tokens.google_token_uri,
            },
            Demo("support-gmail", "google", "ana@gmail.example", "refresh token (google-auth)"),
        )
        # Workspace: a service account with domain-wide delegation for one mailbox.
        key = tokens.register_service_account(allowed_subjects=["billing@fabrikam.example"])
        smtp.add_mailbox("billing@fabrikam.example")
        add(
            {
                "id": "billing-ws",
                "provider": "google_service_account",
                "username": "billing@fabrikam.example",
                "service_account_info": key,
                "subject": "billing@fabrikam.example",
                "token_uri": tokens.google_token_uri,
            },
            Demo(
                "billing-ws", "google_service_account", "billing@fabrikam.example", "JWT bearer (google-auth)"
            ),
        )
        self._register_gmail_api_demo(add)
        self._register_keyless_google_demo(add)
        # Any OAuth2 server: client credentials.
        relay_client, relay_secret = "relay-app", _secret()
        tokens.register_oauth2_client(relay_client, relay_secret, scope="smtp.send")
        smtp.add_mailbox("app@relay.example", allowed_clients=[relay_client])
        add(
            {
                "id": "relay-oauth2",
                "provider": "oauth2",
                "username": "app@relay.example",
                "token_url": tokens.oauth2_token_url,
                "client_id": relay_client,
                "client_secret": relay_secret,
                "scope": "smtp.send",
            },
            Demo("relay-oauth2", "oauth2", "app@relay.example", "client credentials (RFC 6749)"),
        )
        # Any SMTP server with a password.
        password = _secret()
        smtp.add_mailbox("alerts@relay.example", password=password)
        add(
            {
                "id": "relay",
                "provider": "basic",
                "username": "alerts@relay.example",
                "password": password,
                "smtp_check": True,
            },
            Demo("relay", "basic", "alerts@relay.example", "AUTH PLAIN"),
        )
        # A Gmail user who removed the app's access: its refresh token is dead.
        revoked = tokens.issue_refresh_token(client_id, "bo@gmail.example")
        tokens.revoke_refresh_token(revoked)
        smtp.add_mailbox("bo@gmail.example")
        add(
            {
                "id": "gmail-revoked",
                "provider": "google",
                "username": "bo@gmail.example",
                "client_id": client_id,
                "client_secret": client_secret,
                "refresh_token": revoked,
                "token_uri": tokens.google_token_uri,
            },
            Demo("gmail-revoked", "google", "bo@gmail.example", "refresh token", "user revoked access"),
        )
        return demos

    def _register_microsoft_credential_demos(
        self, tenant: str, add: Callable[[dict[str, Any], Demo], None]
    ) -> None:
        """Microsoft 365 with a certificate instead of a secret, and an Outlook.com user's delegated
        consent whose refresh token rotates on every use."""
        from mailbroker_cli.certificates import self_signed

        cert_app = str(uuid.uuid4())
        key_pem, cert_pem = self_signed("mailbroker sandbox orders")
        self.tokens.register_microsoft_app(tenant, cert_app, certificates=[cert_pem])
        self.smtp.add_mailbox("orders@contoso.example", allowed_clients=[cert_app])
        add(
            {
                "id": "m365-cert",
                "provider": "microsoft",
                "username": "orders@contoso.example",
                "tenant_id": tenant,
                "client_id": cert_app,
                "client_certificate": {"private_key": key_pem, "certificate": cert_pem},
                "authority": self.tokens.microsoft_authority(),
            },
            Demo(
                "m365-cert",
                "microsoft",
                "orders@contoso.example",
                "MSAL client assertion (certificate)",
                "certificate valid 365 days",
            ),
        )
        # Outlook.com: a user's delegated consent; the refresh token rotates on every use.
        outlook_app = str(uuid.uuid4())
        self.tokens.register_microsoft_app("consumers", outlook_app, public_client=True)
        self.smtp.add_mailbox("ana@outlook.example")
        add(
            {
                "id": "outlook",
                "provider": "microsoft_delegated",
                "username": "ana@outlook.example",
                "tenant_id": "consumers",
                "client_id": outlook_app,
                "refresh_token": self.tokens.issue_microsoft_refresh_token(
                    "consumers", outlook_app, "ana@outlook.example"
                ),
                "authority": self.tokens.microsoft_authority(),
            },
            Demo(
                "outlook",
                "microsoft_delegated",
                "ana@outlook.example",
                "delegated refresh token (MSAL)",
                "rotates on every use",
            ),
        )

    def _register_graph_demos(
        self, tenant: str, secret: str, add: Callable[[dict[str, Any], Demo], None]
    ) -> None:
        """Two Entra apps with Mail.Send over Microsoft Graph (no SMTP AUTH), each limited by an
        application access policy: support@'s lets its app in, sales@'s lets no app in."""
        apis = self.mail_apis
        for graph_id, mailbox, name, note in (
            ("support-graph", "support@contoso.com", "Contoso Support", "Graph sendMail, no SMTP AUTH"),
            ("sales-graph", "sales@contoso.com", "Contoso Sales", "outside the application access policy"),
        ):
            app = str(uuid.uuid4())
            self.tokens.register_microsoft_app(tenant, app, secret, roles=(), graph_roles=("Mail.Send",))
            apis.add_mailbox(mailbox, graph_clients=[app] if graph_id == "support-graph" else [])
            add(
                {
                    "id": graph_id,
                    "provider": "microsoft",
                    "transport": "graph",
                    "graph_endpoint": apis.base_url,
                    "username": mailbox,
                    "senders": [{"email": mailbox, "name": name}],
                    "tenant_id": tenant,
                    "client_id": app,
                    "client_secret": secret,
                    "authority": self.tokens.microsoft_authority(),
                    # The keeper's live check of a Graph integration: claims and an empty sendMail.
                    "smtp_check": graph_id == "support-graph",
                },
                Demo(graph_id, "microsoft", mailbox, "MSAL client credentials", note, "graph"),
            )

    def _register_keyless_microsoft_demo(
        self, tenant: str, add: Callable[[dict[str, Any], Demo], None]
    ) -> None:
        """Keyless Microsoft: no secret, no certificate; the function role's own STS web identity
        token is the client assertion, trusted through a federated identity credential."""
        from mailbroker_sandbox.web_identity import SANDBOX_ROLE

        app = str(uuid.uuid4())
        self.tokens.register_microsoft_app(tenant, app)
        self.tokens.add_microsoft_federated_credential(
            tenant, app, issuer=self.web_identity.issuer, subject=SANDBOX_ROLE
        )
        self.smtp.add_mailbox("noreply@contoso.example", allowed_clients=[app])
        add(
            {
                "id": "m365-keyless",
                "provider": "microsoft",
                "username": "noreply@contoso.example",
                "tenant_id": tenant,
                "client_id": app,
                "federated": {},
                "authority": self.tokens.microsoft_authority(),
            },
            Demo(
                "m365-keyless",
                "microsoft",
                "noreply@contoso.example",
                "STS web identity token as client assertion (MSAL)",
                "keyless: nothing stored",
            ),
        )

    def _register_keyless_google_demo(self, add: Callable[[dict[str, Any], Demo], None]) -> None:
        """Keyless Workspace: workload identity federation, impersonation, and domain-wide
        delegation through IAM Credentials signJwt."""
        from mailbroker_sandbox.google_federation import GoogleFederation
        from mailbroker_sandbox.web_identity import SANDBOX_ROLE

        federation = self.google_federation
        provider = federation.register_provider(
            SANDBOX_GOOGLE_PROVIDER, self.web_identity.issuer, allowed_subjects={SANDBOX_ROLE}
        )
        account = "mailbroker@mailbroker-sandbox.iam.gserviceaccount.com"
        federation.register_service_account(
            account,
            workload_users={GoogleFederation.principal(provider, SANDBOX_ROLE)},
            delegated_subjects={"ops@fabrikam.example"},
        )
        self.smtp.add_mailbox("ops@fabrikam.example")
        add(
            {
                "id": "workspace-keyless",
                "provider": "google_service_account",
                "username": "ops@fabrikam.example",
                "subject": "ops@fabrikam.example",
                "token_uri": self.tokens.google_token_uri,
                "workload_identity": {
                    "audience": SANDBOX_GOOGLE_PROVIDER,
                    "service_account": account,
                    "sts_endpoint": federation.sts_endpoint,
                    "iamcredentials_endpoint": federation.iamcredentials_endpoint,
                },
            },
            Demo(
                "workspace-keyless",
                "google_service_account",
                "ops@fabrikam.example",
                "workload identity federation + signJwt",
                "keyless: nothing stored",
            ),
        )

    def _register_gmail_api_demo(self, add: Callable[[dict[str, Any], Demo], None]) -> None:
        """A Workspace service account whose delegation grants gmail.send, over the Gmail API."""
        mailbox = "news@fabrikam.example"
        key = self.tokens.register_service_account(allowed_subjects=[mailbox])
        self.mail_apis.add_mailbox(mailbox)
        add(
            {
                "id": "news-ws",
                "provider": "google_service_account",
                "transport": "gmail_api",
                "gmail_endpoint": self.mail_apis.base_url,
                "username": mailbox,
                "service_account_info": key,
                "subject": mailbox,
                "scope": "https://www.googleapis.com/auth/gmail.send",
                "token_uri": self.tokens.google_token_uri,
            },
            Demo(
                "news-ws",
                "google_service_account",
                mailbox,
                "JWT bearer (google-auth)",
                "scope gmail.send",
                "gmail_api",
            ),
        )


def powertools_from_env(env: Mapping[str, str]) -> None:
    """Give the shared Logger and Metrics the template's settings, as a cold start reading the
    function's environment would (they may have been built before the sandbox set it)."""
    from mailbroker.observability import logger, metrics

    if env.get("POWERTOOLS_METRICS_NAMESPACE"):
        metrics.namespace = env["POWERTOOLS_METRICS_NAMESPACE"]
    if env.get("POWERTOOLS_SERVICE_NAME"):
        metrics.service = env["POWERTOOLS_SERVICE_NAME"]
        logger.append_keys(service=env["POWERTOOLS_SERVICE_NAME"])
    if env.get("POWERTOOLS_LOG_LEVEL"):
        logger.setLevel(env["POWERTOOLS_LOG_LEVEL"])


def _secret() -> str:
    return secrets.token_urlsafe(24)


# --- API Gateway HTTP API events -------------------------------------------------------------------


def api_gateway_event(
    method: str,
    path: str,
    body: Any,
    headers: Mapping[str, str] | None,
    routes: list[dict[str, str]],
    region: str = "us-east-1",
) -> dict[str, Any]:
    """The payload v2 event API Gateway would send for ``method path`` (``path`` may carry a
    query string), from a loopback caller. ``routes``: the template's routes, to fill
    ``routeKey`` and ``pathParameters``."""
    parts = urlsplit(path)
    raw_path = parts.path or "/"
    route_key, parameters = "$default", None
    for route in routes:
        match = _route_pattern(route["path"]).fullmatch(raw_path)
        if match and route["method"] in (method.upper(), "ANY"):
            route_key, parameters = f"{route['method']} {route['path']}", match.groupdict()
            break
    sent_headers = {
        "host": "127.0.0.1",
        "user-agent": "mailbroker-sandbox",
        **{k.lower(): v for k, v in (headers or {}).items()},
    }
    if body is not None:
        sent_headers.setdefault("content-type", "application/json")
    event = http_event(
        route_key,
        path=raw_path,
        path_parameters=parameters,
        body=body,
        headers=sent_headers,
        query=parts.query,
    )
    now = dt.datetime.now(dt.UTC)
    event["requestContext"].update(
        accountId="123456789012",
        apiId="sandbox",
        authorizer={
            "iam": {
                "accountId": "123456789012",
                "callerId": "sandbox",
                "userArn": SANDBOX_CALLER,
                "userId": "sandbox",
            }
        },
        domainName="127.0.0.1",
        domainPrefix="sandbox",
        requestId=str(uuid.uuid4()),
        time=now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
        timeEpoch=int(now.timestamp() * 1000),
    )
    event["requestContext"]["http"].update(
        method=method.upper(), sourceIp="127.0.0.1", userAgent="mailbroker-sandbox"
    )
    return event


def _route_pattern(template_path: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template_path))
    return re.compile(pattern)


# --- the SQS event source mapping ------------------------------------------------------------------------


@dataclass
class BatchOutcome:
    received: int = 0
    deleted: int = 0
    failed: list[str] = field(default_factory=list)  # SQS message ids reported in batchItemFailures
    error: str | None = None  # the handler raised: the whole batch returns after its visibility


class QueuePoller:
    """The sender's SQS event source mapping: receive a batch, invoke the function with the SQS
    event, delete what succeeded, leave what failed (``ReportBatchItemFailures``) to its
    visibility timeout — which the sender may have changed to schedule a retry. The queue's own
    redrive policy (``maxReceiveCount``) moves a message that keeps failing to the dead-letter queue."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        settings = sandbox.stack.function_settings(FUNCTIONS["sender"])
        self.queue_url: str = settings["queue_url"]
        self.queue_arn: str = settings["queue_arn"]
        self.batch_size: int = settings["batch_size"]
        self.window: int = settings["maximum_batching_window"]
        self.partial = "ReportBatchItemFailures" in settings["function_response_types"]
        self.sqs = sandbox.client("sqs")
        # receipt handles of messages that failed, so a demo can fast-forward their retry
        self.waiting: dict[str, str] = {}
        # SQS message id -> the message's own id (its idempotency key), as far as the body says
        self.message_ids: dict[str, str] = {}

    def poll_once(self, wait_seconds: int | None = None) -> BatchOutcome:
        answer = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=self.batch_size,
            WaitTimeSeconds=min(self.window, 20) if wait_seconds is None else wait_seconds,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = answer.get("Messages", [])
        outcome = BatchOutcome(received=len(messages))
        if not messages:
            return outcome
        for message in messages:
            self.waiting.pop(message["MessageId"], None)
            self.message_ids[message["MessageId"]] = _declared_id(message["Body"]) or message["MessageId"]
        event = {"Records": [self._record(m) for m in messages]}
        try:
            response = self.sandbox.invoke("sender", event) or {}
        except Exception as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            for message in messages:
                self.waiting[message["MessageId"]] = message["ReceiptHandle"]
            return outcome
        failed = (
            {f["itemIdentifier"] for f in response.get("batchItemFailures", [])} if self.partial else set()
        )
        done = [m for m in messages if m["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            chunk = done[start : start + 10]
            self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)],
            )
        outcome.deleted = len(done)
        outcome.failed = sorted(failed)
        for message in messages:
            if message["MessageId"] in failed:
                self.waiting[message["MessageId"]] = message["ReceiptHandle"]
        return outcome

    def fast_forward(self) -> int:
        """Make every message waiting for a retry visible now (the sandbox's stand-in for the
        passing of the back-off delay). Returns how many."""
        moved = 0
        for message_id, handle in list(self.waiting.items()):
            with contextlib.suppress(Exception):
                self.sqs.change_message_visibility(
                    QueueUrl=self.queue_url, ReceiptHandle=handle, VisibilityTimeout=0
                )
                moved += 1
            del self.waiting[message_id]
        return moved

    def in_flight(self) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )

    def _record(self, message: dict[str, Any]) -> dict[str, Any]:
        return sqs_record(message, self.queue_arn)


def _declared_id(body: str) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


# --- stopping on a signal --------------------------------------------------------------------------------


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM asked the sandbox to stop; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise :class:`Stopped` in the main thread, once, so that
    every ``finally`` and context manager stops what it started; further signals are ignored
    until the previous handlers are restored, so the stop runs to its end.

    Both handlers are installed explicitly: a shell starting a job in the background (``cmd &``
    from a script) sets SIGINT to ignored, Python then keeps it ignored, and SIGTERM's default
    kills the process without running any cleanup at all.
    """
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- mailbroker local ---------------------------------------------------------------------------------


def serve(*, template: str = "template.yaml", port: int = 0, demo: bool = True, out: Any = None) -> int:
    """Keep the sandbox up until interrupted: the HTTP API on 127.0.0.1, the sender polling the
    queue, and the keeper on the template's schedule."""
    from mailbroker_cli.output import Output

    out = out or Output()
    # Handlers that record no metric in an invocation make Powertools warn; in Lambda that is a log line.
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    try:
        with stop_on_signals(), Sandbox(template=template) as sandbox:
            log_path = sandbox.workdir / "functions.log"
            with open(log_path, "a", encoding="utf-8") as sandbox.log:
                _serve(sandbox, port, demo, out, log_path)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the API was up: everything has stopped
        out.note("stopped")
    return 0


def _serve(sandbox: Sandbox, port: int, demo: bool, out: Any, log_path: Path) -> None:
    demos = sandbox.register_demo() if demo else []
    if sandbox.google_client is not None:
        client_file = sandbox.workdir / "google-client.json"
        client_file.write_text(json.dumps(sandbox.google_client, indent=2), encoding="utf-8")
        client_file.chmod(0o600)
    sandbox.subscribe_alerts()
    api = _ApiServer(sandbox, port)
    stop = threading.Event()
    poller = QueuePoller(sandbox)
    workers = [
        threading.Thread(target=_poll_forever, args=(poller, stop), daemon=True, name="sender-esm"),
        threading.Thread(target=_keeper_forever, args=(sandbox, stop), daemon=True, name="keeper-schedule"),
        threading.Thread(
            target=_publish_forever, args=(sandbox.stream_poller(), stop), daemon=True, name="streams-esm"
        ),
    ]
    try:
        for worker in workers:
            worker.start()
        _print_local(out, sandbox, api.url, demos, log_path)
        api.serve_forever()
    except KeyboardInterrupt:
        out.note("\nstopping the sandbox …")
    finally:
        stop.set()
        api.server_close()  # serve_forever ran on this thread: it has returned already
        for worker in workers:
            if worker.is_alive():
                worker.join(timeout=25)


def _print_local(out: Any, sandbox: Sandbox, url: str, demos: list[Demo], log_path: Path) -> None:
    # A shell that exports these still trusts the system's CAs: the bundle holds them and the sandbox CA.
    env = {**sandbox.env, **sandbox.ca.shell_trust_env()}
    client_file = sandbox.workdir / "google-client.json"
    google = (sandbox.google_client or {}).get("installed")
    if out.as_json:
        out.json(
            {
                "http_api": url,
                "environment": {k: v for k, v in env.items() if not k.startswith("POWERTOOLS")},
                "integrations": [d.id for d in demos],
                "smtp": f"127.0.0.1:{sandbox.smtp.port}",
                "mail_apis": sandbox.mail_apis.base_url,
                "token_endpoints": sandbox.tokens.base_url,
                "google_oauth_client": (
                    {"client_id": google["client_id"], "client_secrets_file": str(client_file)}
                    if google
                    else None
                ),
                "log": str(log_path),
                "workdir": str(sandbox.workdir),
            }
        )
        return
    out.line(out.paint("mailbroker sandbox is up", "bold") + " (Ctrl-C stops it)")
    out.line()
    out.line(f"  HTTP API        {url}   (IAM auth is not checked locally)")
    out.line(f"  AWS (moto)      {sandbox.moto.endpoint_url}")
    out.line(f"  token endpoints {sandbox.tokens.base_url}")
    out.line(f"  AWS STS issuer  {sandbox.web_identity.issuer} (GetWebIdentityToken, keyless)")
    out.line(f"  SMTP            127.0.0.1:{sandbox.smtp.port} (STARTTLS, sandbox CA)")
    out.line(f"  Graph, Gmail API {sandbox.mail_apis.base_url} (sendMail, messages.send)")
    out.line(f"  function logs   {log_path}")
    if demos:
        out.line(f"  integrations    {', '.join(d.id for d in demos)}")
    if google:
        out.line(f"  Google OAuth    client {google['client_id']} (with its secret: {client_file})")
    out.line()
    for line in local_examples(env, url, client_file if google else None, sandbox.smtp.port):
        out.line(line)


SHELL_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_CA_BUNDLE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "SECRET_PREFIX", "TOKEN_TABLE", "MESSAGE_TABLE",
    "SEND_QUEUE_URL", "DEAD_LETTER_QUEUE_URL", "ALERT_TOPIC_ARN", "TOKEN_KEY_ID", "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
)  # fmt: skip


def local_examples(env: Mapping[str, str], url: str, google_client: Path | None, smtp_port: int) -> list[str]:
    """What ``mailbroker local`` prints for another shell: each line works exactly as printed, from
    the repository's directory (the README's walkthrough runs them)."""
    lines = [
        "In another shell, in this directory, put the CLI on PATH and point it and the AWS CLI here",
        "(SSL_CERT_FILE / REQUESTS_CA_BUNDLE: the system's CAs plus the sandbox CA):",
        "  source .venv/bin/activate",
    ]
    lines += [f"  export {key}='{env[key]}'" for key in SHELL_KEYS if key in env]
    body = json.dumps(
        {
            "integration": "support-gmail",
            "from": "ana@gmail.example",
            "to": ["you@example.com"],
            "subject": "Hello from the sandbox",
            "text": "It works.",
        }
    )
    lines += [
        "",
        "Then, for example:",
        "  mailbroker integration list",
        "  mailbroker send --file events/message.json --wait",
        "  mailbroker status order-8812-confirmation",
        "  mailbroker test support-m365 --to you@example.com --wait",
        "  mailbroker doctor support-gmail",
        "  mailbroker doctor m365-keyless   # keyless: web identity token, exchange, token, SMTP",
        "  mailbroker dlq list",
        f"  curl -s -X POST {url}/v1/integrations/support-m365/token",
        f"  curl -s {url}/v1/integrations/support-gmail/health",
        f"  curl -s -X POST {url}/v1/messages -H 'content-type: application/json' -d '{body}'",
        "  # AWS CLI v1 and v2 alike (v2.13+ and v1.29+ also read AWS_ENDPOINT_URL by themselves):",
        '  aws --endpoint-url "$AWS_ENDPOINT_URL" sqs send-message --queue-url "$SEND_QUEUE_URL" '
        + f"--message-body '{body}'",
    ]
    if google_client is not None:
        lines += [
            "  # Gmail consent against the Google stand-in (no browser here: approve anywhere, paste back):",
            f"  mailbroker consent google my-gmail --client-secrets {google_client} "
            f"--username ana@gmail.example --smtp-host 127.0.0.1 --smtp-port {smtp_port}",
        ]
    return lines


def _poll_forever(poller: QueuePoller, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            outcome = poller.poll_once(wait_seconds=1)
        except Exception:
            stop.wait(1)
            continue
        if not outcome.received:
            stop.wait(0.2)


def _publish_forever(poller: Any, stop: threading.Event) -> None:
    """The event publisher's stream mappings: delivery events reach the rule's queue within a second."""
    while not stop.is_set():
        try:
            outcome = poller.poll_once()
        except Exception:
            stop.wait(1)
            continue
        if not outcome.read:
            stop.wait(0.5)


def _keeper_forever(sandbox: Sandbox, stop: threading.Event) -> None:
    interval = _schedule_seconds(
        sandbox.stack.function_settings(FUNCTIONS["keeper"]).get("schedule_expression")
    )
    while not stop.is_set():
        with contextlib.suppress(Exception):
            sandbox.invoke("keeper", _schedule_event(sandbox))
        stop.wait(interval)


def _schedule_seconds(expression: str | None) -> float:
    match = re.fullmatch(r"rate\((\d+)\s+(minute|minutes|hour|hours|day|days)\)", expression or "")
    if not match:
        return 3600.0
    unit = {"minute": 60, "hour": 3600, "day": 86400}[match.group(2).rstrip("s")]
    return float(int(match.group(1)) * unit)


def _schedule_event(sandbox: Sandbox) -> dict[str, Any]:
    """The event EventBridge Scheduler sends (events/schedule.json's shape)."""
    return schedule_event(sandbox.stack.account_id, sandbox.stack.region)


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sandbox: Sandbox, port: int) -> None:
        self.sandbox = sandbox
        super().__init__(("127.0.0.1", port), _ApiHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _ApiHandler(BaseHTTPRequestHandler):
    server: _ApiServer
    server_version = "mailbroker-sandbox-api/1"
    sys_version = ""

    def do_GET(self) -> None:
        self._forward("GET")

    def do_POST(self) -> None:
        self._forward("POST")

    def do_PUT(self) -> None:
        self._forward("PUT")

    def do_DELETE(self) -> None:
        self._forward("DELETE")

    def _forward(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else None
        headers = dict(self.headers.items())
        event = api_gateway_event(method, self.path, body, headers, self.server.sandbox.stack.http_routes)
        try:
            sandbox = self.server.sandbox
            answer = sandbox.invoke(sandbox.route_function(event["routeKey"]), event)
        except Exception as exc:
            answer = {
                "statusCode": 502,
                "body": json.dumps({"message": f"function error: {type(exc).__name__}"}),
            }
        payload = answer.get("body") or ""
        data = base64.b64decode(payload) if answer.get("isBase64Encoded") else payload.encode("utf-8")
        self.send_response(int(answer.get("statusCode", 200)))
        for name, value in (answer.get("headers") or {}).items():
            self.send_header(name, str(value))
        if not any(k.lower() == "content-type" for k in (answer.get("headers") or {})):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return  # requests are not logged: a token answer must not reach a terminal log
