"""``make run`` (``python -m mailbroker_sandbox.run``): the whole path on one machine, then stop.

Starts moto server, the sandbox token endpoints, SMTP server and Graph / Gmail API stand-ins on
free loopback ports, creates the stack's tables, queues, topic and key from template.yaml and
gives each function the environment the template sets. Registers one integration per provider
type and per HTTP transport (Graph sendMail, the Gmail API), asks the token broker for a token
for each (direct invoke), queues demo messages (two bound to fail for good, one throttled once),
drives the sender as the SQS event source mapping would, runs the keeper
once, drives the event publisher from the tables' DynamoDB streams as its event source mappings
would, prints the delivery events the template's rule delivered to an SQS queue, and prints what
happened. Then it stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailbroker_cli.output import Output, ago
from mailbroker_sandbox.local import (
    FUNCTIONS,
    Demo,
    QueuePoller,
    Sandbox,
    Stopped,
    _schedule_event,
    stop_on_signals,
)

if TYPE_CHECKING:
    from mailbroker.messages.status import MessageStatusStore

THROTTLED_RECIPIENT = "busy@example.net"
THROTTLE_REPLY = (
    "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional "
    "messages from being delivered."
)


@dataclass(frozen=True)
class DemoMessage:
    message: dict[str, Any]
    via: str  # "http" (POST /v1/messages) or "sqs" (straight onto the queue)
    expect: str


def demo_messages() -> list[DemoMessage]:
    def message(mid: str, integration: str, sender: Any, to: str, subject: str) -> dict[str, Any]:
        return {
            "integration": integration,
            "id": mid,
            "usage": "transactional",
            "from": sender,
            "to": [to],
            "subject": subject,
            "text": f"{subject}.\n\n-- sent through the mailbroker sandbox",
            "html": f"<p>{subject}.</p>",
        }

    return [
        DemoMessage(
            message(
                "order-8812",
                "support-m365",
                {"email": "support@contoso.com", "name": "Contoso Support"},
                "customer@example.com",
                "Your order 8812 has shipped",
            ),
            "http",
            "delivered",
        ),
        DemoMessage(
            message(
                "invoice-2211",
                "support-m365",
                {"email": "billing@contoso.com", "name": "Contoso Billing"},
                "customer@example.com",
                "Invoice 2211",
            ),
            "http",
            "fails for good: the mailbox has no SendAs right on billing@",
        ),
        DemoMessage(
            message(
                "order-8813",
                "support-graph",
                {"email": "support@contoso.com", "name": "Contoso Support"},
                "customer@example.com",
                "Your order 8813 has shipped",
            ),
            "http",
            "delivered over Graph sendMail (202)",
        ),
        DemoMessage(
            message(
                "quote-5120",
                "sales-graph",
                {"email": "sales@contoso.com", "name": "Contoso Sales"},
                "customer@example.com",
                "Quote 5120",
            ),
            "http",
            "fails for good: the application access policy leaves sales@ out",
        ),
        DemoMessage(
            message(
                "newsletter-11", "news-ws", "news@fabrikam.example", "reader@example.org", "Newsletter 11"
            ),
            "http",
            "delivered over the Gmail API (200 id)",
        ),
        DemoMessage(
            message(
                "welcome-ana", "support-gmail", "ana@gmail.example", "friend@example.org", "Welcome aboard"
            ),
            "http",
            "delivered",
        ),
        DemoMessage(
            message(
                "receipt-77", "billing-ws", "billing@fabrikam.example", "client@example.org", "Receipt 77"
            ),
            "http",
            "delivered",
        ),
        DemoMessage(
            message("report-q3", "relay-oauth2", "app@relay.example", "team@example.org", "Q3 report ready"),
            "sqs",
            "delivered (posted straight to SQS)",
        ),
        DemoMessage(
            message("alert-disk", "relay", "alerts@relay.example", THROTTLED_RECIPIENT, "Disk 91% full"),
            "http",
            "throttled once (450 4.2.1), then delivered",
        ),
        DemoMessage(
            message(
                "ship-9001",
                "m365-cert",
                "orders@contoso.example",
                "customer@example.com",
                "Order 9001 shipped",
            ),
            "http",
            "delivered (certificate credential)",
        ),
        DemoMessage(
            message("hello-bo", "outlook", "ana@outlook.example", "bo@example.org", "Hello from Outlook.com"),
            "http",
            "delivered (delegated refresh token)",
        ),
        # After the throttled message: it stays in the sender's first batch of ten.
        DemoMessage(
            message(
                "notice-5150",
                "m365-keyless",
                "noreply@contoso.example",
                "customer@example.com",
                "Your password was changed",
            ),
            "http",
            "delivered (keyless: the function role's own identity)",
        ),
        DemoMessage(
            message(
                "digest-12",
                "workspace-keyless",
                "ops@fabrikam.example",
                "client@example.org",
                "Weekly digest",
            ),
            "http",
            "delivered (keyless: workload identity federation)",
        ),
    ]


def redact(token: str) -> str:
    """Enough to tell tokens apart, never enough to use one."""
    from mailbroker.tokens.model import fingerprint

    return f"{token[:8]}…[{len(token)} chars, sha256 {fingerprint(token)[:8]}]"


class Run:
    def __init__(self, out: Output, log_path: Path) -> None:
        self.out = out
        self.log_path = log_path
        self.started = time.monotonic()

    # --- printing ----------------------------------------------------------------------------------

    def section(self, title: str) -> None:
        self.out.line()
        self.out.line(self.out.paint(f"▸ {title}", "bold"))

    def say(self, text: str = "") -> None:
        self.out.line(f"  {text}" if text else "")

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        from mailbroker_cli.output import render_table

        for line in render_table(headers, rows, header_style=lambda h: self.out.paint(h, "dim")):
            self.out.line(f"  {line}")

    # --- the run -----------------------------------------------------------------------------------

    def main(self, sandbox: Sandbox) -> int:
        out = self.out
        out.line(
            out.paint("mailbroker sandbox", "bold")
            + " — the whole path on this machine; nothing leaves 127.0.0.1"
        )
        self.section("Started")
        self.show_started(sandbox)
        self.section(
            "Integrations, one per provider type and transport (Secrets Manager, prefix "
            + sandbox.env["SECRET_PREFIX"]
            + ")"
        )
        demos = sandbox.register_demo()
        self.table(
            ["ID", "PROVIDER", "TRANSPORT", "MAILBOX", "AUTH", "NOTE"],
            [[d.id, d.provider, d.transport, d.mailbox, d.auth, d.note or ""] for d in demos],
        )
        self.show_keyless(sandbox, demos)
        sandbox.subscribe_alerts()
        self.section('Tokens from the token broker (direct invoke {"integration": ID}), redacted')
        self.show_tokens(sandbox, demos)
        publisher = sandbox.stream_poller()
        self.section("Messages queued")
        ids = self.queue_messages(sandbox)
        self.section("Sender, driven as the SQS event source mapping drives it")
        self.drive_sender(sandbox)
        self.section("Deliveries (status records, GET /v1/messages/{id})")
        failures = self.show_deliveries(sandbox, ids)
        self.section("Keeper, invoked once with the scheduled event")
        self.run_keeper(sandbox, demos)
        self.section("Delivery events (tables' streams → event publisher → EventBridge → rule → SQS target)")
        self.show_events(sandbox, publisher)
        self.section("Token calls per credential (counted by the provider stand-ins)")
        self.show_token_calls(sandbox, demos)
        self.out.line()
        elapsed = time.monotonic() - self.started
        self.out.line(
            out.paint(f"Done in {elapsed:.1f} s.", "bold")
            + f" Function logs (JSON, as CloudWatch would get them): {self.log_path}"
        )
        expected_failures = {"invoice-2211", "quote-5120"}
        return 0 if failures == expected_failures else 1

    def show_keyless(self, sandbox: Sandbox, demos: list[Demo]) -> None:
        """What a keyless integration's secret holds, read back from Secrets Manager: no credential."""
        import json

        credentials = {
            "client_secret",
            "client_certificate",
            "refresh_token",
            "password",
            "service_account_info",
        }
        secrets = sandbox.client("secretsmanager")
        for demo in demos:
            if "keyless" not in demo.note:
                continue
            secret_id = sandbox.integrations.secret_name(demo.id)
            document = json.loads(secrets.get_secret_value(SecretId=secret_id)["SecretString"])
            kind = "federated" if "federated" in document else "workload_identity"
            held = sorted(credentials & set(document))
            verdict = f"✗ holds {', '.join(held)}" if held else "no secret, key or token"
            self.say(
                f"{self.out.mark(not held)} {demo.id}: {kind} = {json.dumps(document[kind])} — {verdict}"
            )

    def show_started(self, sandbox: Sandbox) -> None:
        stack = sandbox.stack
        ok = self.out.mark(True)
        self.say(f"{ok} moto server (DynamoDB, SQS, SNS, Secrets Manager, KMS)  {sandbox.moto.endpoint_url}")
        self.say(f"{ok} token endpoints (Entra ID, Google, OAuth2) over HTTPS   {sandbox.tokens.base_url}")
        self.say(f"{ok} SMTP server (STARTTLS, XOAUTH2, AUTH PLAIN)            127.0.0.1:{sandbox.smtp.port}")
        self.say(f"{ok} Graph sendMail and Gmail messages.send over HTTPS     {sandbox.mail_apis.base_url}")
        self.say(f"{ok} AWS web identity issuer + STS GetWebIdentityToken      {sandbox.web_identity.issuer}")
        google = sandbox.google_federation.base_url
        self.say(f"{ok} Google STS + IAM Credentials (signJwt)                  {google}")
        self.say(f"{ok} sandbox CA trusted through SSL_CERT_FILE / REQUESTS_CA_BUNDLE")
        created = {
            "tables": list(stack.table_names.values()),
            "queues": [url.rsplit("/", 1)[-1] for url in stack.queue_urls.values()],
            "topic": [arn.rsplit(":", 1)[-1] for arn in stack.topic_arns.values()],
            "KMS key": list(stack.key_ids.values())[:1],
        }
        self.say(f"{self.out.mark(True)} created from template.yaml:")
        for kind, names in created.items():
            self.say(f"    {kind:<8} {', '.join(names)}")
        envs = {logical_id: stack.function_env(logical_id) for logical_id in FUNCTIONS.values()}
        shared = set.intersection(*(set(env) for env in envs.values()))
        shown = sorted(name for name in shared if not name.startswith("POWERTOOLS"))
        self.say(f"{self.out.mark(True)} each function's settings and environment, read from template.yaml")
        self.say(f"    every function: {' '.join(shown)} (+ POWERTOOLS_*)")
        rows = []
        for function, logical_id in FUNCTIONS.items():
            settings = stack.function_settings(logical_id)
            trigger = "HTTP API, direct invoke"
            if function == "sender":
                trigger = (
                    f"SQS batch {settings['batch_size']}, window {settings['maximum_batching_window']} s, "
                    + ", ".join(settings["function_response_types"])
                )
            elif function == "keeper":
                trigger = f"schedule {settings.get('schedule_expression')}"
            elif function == "tracking":
                trigger = "HTTP API " + ", ".join(path for _, path in settings["routes"]) + " (no IAM)"
            elif settings["streams"]:
                trigger = "DynamoDB streams of " + ", ".join(
                    _table_of(stack, s["stream_arn"]) for s in settings["streams"]
                )
            own = " ".join(sorted(set(envs[logical_id]) - shared))
            rows.append([logical_id, f"{settings['timeout']} s", trigger, own])
        self.table(["FUNCTION", "TIMEOUT", "TRIGGER", "ITS OWN ENVIRONMENT"], rows)

    def show_tokens(self, sandbox: Sandbox, demos: list[Demo]) -> None:
        rows = []
        problems = []
        for demo in demos:
            if demo.provider == "basic":
                rows.append([demo.id, "(basic: AUTH PLAIN, no token)", "-", "-", "-"])
                continue
            first = sandbox.invoke("token_broker", {"integration": demo.id})
            if "error" in first:
                error = first["error"]
                rows.append([demo.id, self.out.paint(f"✗ {error['code']}", "red"), "-", "-", "-"])
                problems.append((demo.id, error))
                continue
            again = sandbox.invoke("token_broker", {"integration": demo.id})
            rows.append(
                [
                    demo.id,
                    redact(first["access_token"]),
                    f"{int(first['expires_at'] - time.time())} s",
                    first["source"],
                    again["source"],
                ]
            )
        self.table(["ID", "ACCESS TOKEN", "EXPIRES IN", "1ST CALL", "2ND CALL"], rows)
        for integration_id, error in problems:
            self.say(f"{self.out.mark(False)} {integration_id}: {error['message']}")
            self.say(f"   hint: {error['hint']}")

    def queue_messages(self, sandbox: Sandbox) -> list[str]:
        sandbox.smtp.fail("rcpt", 450, THROTTLE_REPLY, recipient=THROTTLED_RECIPIENT, times=1)
        rows = []
        ids = []
        for demo in demo_messages():
            message = demo.message
            if demo.via == "http":
                status, _, body = sandbox.http("POST", "/v1/messages", json.dumps(message))
                via = f"POST /v1/messages → {status} {body.get('status') if isinstance(body, dict) else body}"
            else:
                sandbox.client("sqs").send_message(
                    QueueUrl=sandbox.env["SEND_QUEUE_URL"], MessageBody=json.dumps(message)
                )
                via = "SQS SendMessage"
            sender = message["from"]["email"] if isinstance(message["from"], dict) else message["from"]
            rows.append(
                [message["id"], message["integration"], f"{sender} → {message['to'][0]}", via, demo.expect]
            )
            ids.append(message["id"])
        self.table(["MESSAGE", "INTEGRATION", "FROM → TO", "VIA", "EXPECTED"], rows)
        return ids

    def drive_sender(self, sandbox: Sandbox) -> None:
        poller = QueuePoller(sandbox)
        statuses = _status_store(sandbox)
        self.say(
            f"batch size {poller.batch_size}, batching window {poller.window} s, "
            f"{'ReportBatchItemFailures' if poller.partial else 'whole-batch failures'}; "
            "successes deleted, failures left to their visibility timeout"
        )
        deadline = time.monotonic() + 45
        batch = 0
        while time.monotonic() < deadline:
            outcome = poller.poll_once(wait_seconds=1)
            if outcome.received:
                batch += 1
                story = self._batch_story(outcome, poller, statuses)
                self.say(f"batch {batch}: {outcome.received} received → {story}")
                continue
            if poller.waiting:
                waits = [self._retry_in(statuses, poller, sqs_id) for sqs_id in poller.waiting]
                longest = max((w for w in waits if w is not None), default=0)
                moved = poller.fast_forward()
                self.say(
                    self.out.paint(f"⏩ fast-forward {longest} s", "yellow")
                    + f": the sandbox makes {moved} message(s) due for retry now instead of waiting"
                )
                continue
            if poller.in_flight() == 0:
                self.say(f"{self.out.mark(True)} send queue empty")
                break
        dlq = sandbox.client("sqs").get_queue_attributes(
            QueueUrl=sandbox.env["DEAD_LETTER_QUEUE_URL"], AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]["ApproximateNumberOfMessages"]
        self.say(f"dead-letter queue: {dlq} message(s), each with its error attached ('mailbroker dlq list')")

    def _batch_story(self, outcome: Any, poller: QueuePoller, statuses: Any) -> str:
        if outcome.error:
            return (
                f"the function failed ({outcome.error}); the whole batch returns after its visibility timeout"
            )
        parts = [f"{outcome.deleted} deleted"]
        if outcome.failed:
            parts.append(f"{len(outcome.failed)} reported in batchItemFailures")
            for sqs_id in outcome.failed:
                seconds = self._retry_in(statuses, poller, sqs_id)
                if seconds is not None:
                    parts.append(f"retry scheduled in {seconds} s (visibility changed)")
        return ", ".join(parts)

    def _retry_in(self, statuses: Any, poller: QueuePoller, sqs_id: str) -> int | None:
        message_id = poller.message_ids.get(sqs_id)
        record = statuses.get(message_id) if message_id else None
        if record is None or record.next_attempt_at is None:
            return None
        return max(int(record.next_attempt_at - time.time()), 0)

    def show_deliveries(self, sandbox: Sandbox, ids: list[str]) -> set[str]:
        rows = []
        failed: dict[str, dict[str, Any]] = {}
        for message_id in ids:
            status, _, record = sandbox.http("GET", f"/v1/messages/{message_id}")
            if status != 200:
                rows.append([message_id, "-", self.out.paint("missing", "red"), "-", "-"])
                continue
            word = record["status"]
            colour = {"sent": "green", "failed": "red"}.get(word, "yellow")
            # A failed HTTP send has no SMTP reply: the API's answer is the error's message.
            error = record.get("last_error") or {}
            reply = record.get("reply") or error.get("reply") or error.get("message") or "-"
            rows.append(
                [
                    message_id,
                    record.get("integration"),
                    self.out.paint(word, colour),
                    record.get("attempts"),
                    reply,
                ]
            )
            if word != "sent":
                failed[message_id] = record
        self.table(["MESSAGE", "INTEGRATION", "STATUS", "ATTEMPTS", "SERVER'S REPLY"], rows)
        for message_id, record in failed.items():
            error = record.get("last_error") or {}
            said = error.get("reply") or error.get("message")
            where = f" at {error['stage']}" if error.get("stage") else ""
            self.say(f"{self.out.mark(False)} {message_id} failed for good: {error.get('code')}{where}")
            self.say(f"   server said: {said}")
            self.say(f"   hint: {error.get('hint')}")
        accepted = len(sandbox.smtp.accepted)
        self.say(
            f"the SMTP server accepted {accepted} message(s) in {sandbox.smtp.connections} connection(s)"
        )
        apis = sandbox.mail_apis
        by_api = {api: sum(m.api == api for m in apis.received) for api in ("graph", "gmail")}
        self.say(
            f"the Graph and Gmail API stand-ins accepted {by_api['graph']} + {by_api['gmail']} message(s) "
            f"in {apis.requests} request(s) over {apis.connections} TLS connection(s)"
        )
        return set(failed)

    def run_keeper(self, sandbox: Sandbox, demos: list[Demo]) -> None:
        summary = sandbox.invoke("keeper", _schedule_event(sandbox))
        self.say(
            f"summary: checked {len(summary['checked'])}, healthy {len(summary['healthy'])}, "
            f"refreshed {len(summary['refreshed'])}, unhealthy {len(summary['unhealthy'])} "
            f"({', '.join(summary['unhealthy']) or 'none'}), alerts {summary['alerts']}"
        )
        rows = []
        notes = []
        for demo in demos:
            status, _, record = sandbox.http("GET", f"/v1/integrations/{demo.id}/health")
            if status != 200:
                rows.append([demo.id, self.out.paint("no record", "red"), "-", "-", "-", "-"])
                continue
            healthy = (
                self.out.paint("healthy", "green")
                if record["healthy"]
                else self.out.paint("unhealthy", "red")
            )
            error = record.get("last_error")
            rows.append(
                [
                    demo.id,
                    healthy,
                    _ago_iso(record.get("last_success")),
                    _ago_iso(record.get("last_refresh")),
                    _ago_iso(record.get("token_expires_at")),
                    "yes" if record.get("smtp_checked") else "no",
                    error["code"] if error else "-",
                ]
            )
            for warning in record.get("warnings") or []:
                notes.append(f"{self.out.paint('!', 'yellow')} {demo.id}: {warning}")
        self.table(
            ["ID", "HEALTH", "LAST SUCCESS", "LAST REFRESH", "TOKEN EXPIRES", "LIVE CHECK", "LAST ERROR"],
            rows,
        )
        for note in notes:
            self.say(note)
        self.say(
            "(records from GET /v1/integrations/{id}/health; refresh tokens are exercised at least every "
            f"{sandbox.env.get('KEEP_ALIVE_DAYS', '7')} days)"
        )
        alerts = sandbox.alerts()
        self.say(f"alerts on the SNS topic ({len(alerts)}, one per transition):")
        for alert in alerts:
            self.say(f"  {self.out.paint('✉', 'yellow')} {alert['subject']}")
            if alert.get("command"):
                self.say(f"    run: {alert['command']}")

    def show_events(self, sandbox: Sandbox, publisher: Any) -> None:
        outcome = publisher.drain()
        self.say(
            f"{outcome.read} stream record(s) passed the mappings' filters, {outcome.invocations} "
            f"invocation(s), {outcome.failed} record(s) offered again"
        )
        seen = sandbox.delivery_events(wait_seconds=1)
        rows = []
        for event in seen:
            detail = event["detail"]
            said = detail.get("code") or detail.get("reply") or "-"
            rows.append(
                [event["detail-type"], detail["id"], detail["status"], detail["attempts"], detail["at"], said]
            )
        self.table(["DETAIL TYPE", "ID", "STATUS", "ATTEMPTS", "AT", "CODE / REPLY"], rows)
        self.say(
            f"{len(seen)} event(s) on the rule's SQS target; consumers de-duplicate by "
            "(id, detail-type, attempts)"
        )

    def show_token_calls(self, sandbox: Sandbox, demos: list[Demo]) -> None:
        from mailbroker.integrations import (
            BasicIntegration,
            GoogleIntegration,
            GoogleServiceAccountIntegration,
            MicrosoftDelegatedIntegration,
            MicrosoftIntegration,
        )

        tokens = sandbox.tokens
        store = sandbox.integrations
        rows = []
        for demo in demos:
            integration = store.get(demo.id)
            if isinstance(integration, BasicIntegration):
                continue
            if isinstance(integration, MicrosoftIntegration):
                count = tokens.issued(provider="microsoft", client_id=integration.client_id)
                credential = f"app {integration.client_id[:8]}… in tenant {integration.tenant_id[:8]}…"
                if integration.federated is not None:
                    credential += " (keyless)"
            elif isinstance(integration, MicrosoftDelegatedIntegration):
                count = tokens.issued(provider="microsoft_delegated", client_id=integration.client_id)
                credential = f"refresh token of {integration.username} (rotated {count} time(s))"
            elif isinstance(integration, GoogleIntegration):
                count = tokens.issued(
                    provider="google", client_id=integration.client_id, subject=integration.username
                )
                credential = f"refresh token of {integration.username}"
            elif isinstance(integration, GoogleServiceAccountIntegration):
                count = tokens.issued(provider="google_service_account", subject=integration.subject)
                credential = f"{integration.service_account_email.split('@')[0]}… as {integration.subject}"
                if integration.workload_identity is not None:
                    credential += " (keyless)"
            else:
                count = tokens.issued(provider="oauth2", client_id=integration.client_id)
                credential = f"client {integration.client_id}"
            rows.append([demo.id, credential, count])
        self.table(["ID", "CREDENTIAL", "TOKENS ISSUED"], rows)
        self.say(
            f"{tokens.requests} token-endpoint request(s) in all: each credential's token is cached "
            "(memory, then DynamoDB, sealed with KMS) and reused until it is due for refresh"
        )


def _status_store(sandbox: Sandbox) -> MessageStatusStore:
    from mailbroker import runtime
    from mailbroker.settings import MessageTableEnv

    return runtime.status_store(MessageTableEnv.from_env(sandbox.env))


def _table_of(stack: Any, stream_arn: str) -> str:
    """The logical id of the table whose stream ``stream_arn`` is."""
    for logical_id in stack.table_names:
        if stack.attribute(logical_id, "StreamArn") == stream_arn:
            return str(logical_id)
    return stream_arn


def _ago_iso(text: str | None) -> str:
    from mailbroker.health import epoch

    return ago(epoch(text)) if text else "-"


def main(argv: list[str] | None = None) -> int:
    # Handlers that record no metric in an invocation make Powertools warn; in Lambda that is a log line.
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    parser = argparse.ArgumentParser(
        prog="python -m mailbroker_sandbox.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--template", default=None, help="template.yaml to provision (default: the repo's)")
    args = parser.parse_args(argv)
    out = Output()
    import tempfile

    # The function log outlives the run on purpose: its path is printed for reading afterwards.
    # Everything else the run starts or writes is stopped and removed on the way out.
    log_path = Path(tempfile.mkdtemp(prefix="mailbroker-run-")) / "functions.log"
    with open(log_path, "w", encoding="utf-8") as log:
        run = Run(out, log_path)
        try:
            with stop_on_signals(), Sandbox(template=args.template, log=log) as sandbox:
                code = run.main(sandbox)
        except Stopped as stopped:
            out.note(f"stopped by {signal.Signals(stopped.signum).name}; everything started was stopped")
            return 128 + stopped.signum
        except KeyboardInterrupt:
            out.note("interrupted; everything started was stopped")
            return 128 + signal.SIGINT
    out.line("Everything it started has stopped.")
    return code


if __name__ == "__main__":
    sys.exit(main())
