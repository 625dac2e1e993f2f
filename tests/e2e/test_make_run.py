"""``make run`` from the outside: ``python -m mailbroker_sandbox.run`` as a subprocess, read the way a
newcomer reads it, and nothing it started left running."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run() -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    }
    # The timeout only keeps a hung run from hanging the suite; how long make run takes is not
    # asserted here (a loaded machine makes it slow, not wrong).
    return subprocess.run(
        [sys.executable, "-m", "mailbroker_sandbox.run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )


def section(out: str, title: str) -> str:
    """The lines of one "▸" section of the output."""
    start = out.index(title)
    following = out.find("▸", start + len(title))
    return out[start : following if following != -1 else len(out)]


# The OAuth integrations make run registers for SMTP, each with one token call.
OAUTH_DEMOS = (
    "support-m365",
    "m365-cert",
    "m365-keyless",
    "outlook",
    "support-gmail",
    "billing-ws",
    "workspace-keyless",
    "relay-oauth2",
)


@pytest.mark.xdist_group("make-run")
@pytest.mark.timeout(450)
def test_make_run_succeeds_and_leaves_no_server_it_started_running(run):
    completed = run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Everything it started has stopped." in completed.stdout
    assert "Traceback" not in completed.stderr
    started = section(completed.stdout, "▸ Started")
    # moto server, token endpoints, SMTP server, Graph / Gmail API stand-ins, the AWS web identity
    # issuer (STS GetWebIdentityToken), Google STS and IAM Credentials, each on its own port
    ports = re.findall(r"127\.0\.0\.1:(\d+)", started)
    assert len(set(ports)) == 6, started
    # The token, SMTP and mail API servers live in the run's process; moto server is a process of
    # its own, in a session of its own, so only an explicit stop ends it.
    moto_port = re.search(r"moto server .* http://127\.0\.0\.1:(\d+)", started)
    assert moto_port is not None, started
    assert _processes_with("mailbroker_sandbox.moto_atomic", f"-p {moto_port.group(1)}") == []


def _processes_with(*parts: str) -> list[int]:
    """Live processes whose command line holds every one of ``parts``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if all(part in command for part in parts):
                found.append(int(entry.name))
    return found


@pytest.mark.xdist_group("make-run")
def test_make_run_prints_a_redacted_token_for_each_oauth_provider(run):
    out = section(run.stdout, "▸ Tokens")
    for integration in OAUTH_DEMOS:
        line = next(line for line in out.splitlines() if line.strip().startswith(integration + " "))
        assert re.search(r"…\[\d+ chars, sha256 [0-9a-f]{8}\]\s+\d+ s\s+provider\s+memory", line), line
    assert re.search(r"gmail-revoked\s+✗ token_invalid_grant", out)


@pytest.mark.xdist_group("make-run")
def test_make_run_shows_deliveries_with_server_replies_and_the_failure_with_code_and_hint(run):
    out = run.stdout
    for message in ("order-8812", "ship-9001", "hello-bo", "welcome-ana", "receipt-77", "report-q3"):
        assert re.search(rf"{message}\s+\S+\s+sent\s+1\s+250 2\.0\.0 OK <", out), message
    assert re.search(r"alert-disk\s+relay\s+sent\s+2\s+250 2\.0\.0 OK", out)  # throttled once
    assert "invoice-2211 failed for good: send_as_denied" in out
    hint = r"hint: The mailbox \S+ may not send as this 'from' address.*Add-RecipientPermission"
    assert re.search(hint, out)
    assert "dead-letter queue: 2 message(s)" in out


@pytest.mark.xdist_group("make-run")
def test_make_run_delivers_over_graph_and_the_gmail_api_and_shows_a_graph_failure_with_its_hint(run):
    out = run.stdout
    integrations = section(out, "▸ Integrations")
    assert re.search(r"support-graph\s+microsoft\s+graph\s+support@contoso\.com", integrations)
    assert re.search(r"news-ws\s+google_service_account\s+gmail_api\s+news@fabrikam\.example", integrations)
    assert re.search(r"order-8813\s+support-graph\s+sent\s+1\s+202 Accepted request-id=", out)
    assert re.search(r"newsletter-11\s+news-ws\s+sent\s+1\s+200 id=\w+ threadId=\w+", out)
    assert re.search(
        r"quote-5120\s+sales-graph\s+failed\s+1\s+Graph sendMail answered 403 ErrorAccessDenied", out
    )
    assert "quote-5120 failed for good: graph_access_denied" in out
    assert "hint: Graph answered 403 ErrorAccessDenied" in out and "Test-ApplicationAccessPolicy" in out
    assert "the Graph and Gmail API stand-ins accepted 1 + 1 message(s)" in out


@pytest.mark.xdist_group("make-run")
def test_make_run_drives_the_sender_as_the_event_source_mapping_does(run):
    out = run.stdout
    assert re.search(
        r"batch 1: 10 received → 9 deleted, 1 reported in batchItemFailures, retry scheduled", out
    )
    assert "fast-forward" in out
    assert "✓ send queue empty" in out


@pytest.mark.xdist_group("make-run")
def test_make_run_shows_health_alerts_and_token_calls_per_credential(run):
    out = run.stdout
    assert "summary: checked 13, healthy 12, refreshed 0, unhealthy 1 (gmail-revoked), alerts 2" in out
    assert re.search(r"support-graph\s+healthy\s+.*\byes\b", out)  # the Graph live check ran
    assert re.search(r"gmail-revoked\s+unhealthy\s+.*token_invalid_grant", out)
    assert "mailbroker: gmail-revoked needs re-consent" in out
    assert "run: mailbroker consent google gmail-revoked" in out
    assert "mailbroker: client secret of support-m365 expires" in out
    calls = section(out, "▸ Token calls per credential")
    for integration in (*OAUTH_DEMOS, "support-graph", "news-ws"):
        assert re.search(rf"^\s+{re.escape(integration)}\s+.+\s1$", calls, re.MULTILINE), integration


@pytest.mark.xdist_group("make-run")
def test_make_run_reads_resources_and_function_settings_from_the_template(run):
    out = run.stdout
    assert "tables   mailbroker-TokenTable, mailbroker-MessageTable" in out
    assert re.search(r"SenderFunction\s+90 s\s+SQS batch 10, window 1 s, ReportBatchItemFailures", out)
    assert re.search(
        r"KeeperFunction\s+300 s\s+schedule rate\(1 hour\)\s+ALERT_TOPIC_ARN KEEP_ALIVE_DAYS", out
    )


@pytest.mark.xdist_group("make-run")
def test_make_run_prints_no_credential(run):
    completed = run
    text = completed.stdout + completed.stderr
    assert not re.search(r"eyJ[\w-]{20,}\.[\w-]{20,}", text)  # no whole JWT
    assert not re.search(r"ya29\.[\w-]{20,}", text)
    assert not re.search(r"1//0[\w-]{20,}", text)


@pytest.mark.xdist_group("make-run")
def test_make_run_prints_the_delivery_events_the_rules_sqs_target_received(run):
    out = section(run.stdout, "▸ Delivery events")
    for message in ("order-8812", "ship-9001", "hello-bo", "welcome-ana", "receipt-77", "report-q3"):
        assert re.search(rf"Message Sent\s+{message}\s+sent\s+1\s+\S+\s+250 2\.0\.0 OK <", out), message
    assert re.search(r"Message Failed\s+invoice-2211\s+failed\s+1\s+\S+\s+send_as_denied", out)
    assert re.search(r"Message Retrying\s+alert-disk\s+retrying\s+1\s+\S+\s+throttled", out)
    assert re.search(r"Message Sent\s+alert-disk\s+sent\s+2\s", out)
    assert re.search(
        r"Integration Health Changed\s+gmail-revoked\s+unhealthy\s+\d+\s+\S+\s+token_invalid_grant", out
    )
    assert re.search(r"Message Sent\s+order-8813\s+sent\s+1\s+\S+\s+202 Accepted request-id=", out)
    assert re.search(r"Message Sent\s+newsletter-11\s+sent\s+1\s+\S+\s+200 id=", out)
    assert re.search(r"Message Failed\s+quote-5120\s+failed\s+1\s+\S+\s+graph_access_denied", out)
    assert "15 event(s) on the rule's SQS target" in out


@pytest.mark.xdist_group("make-run")
def test_make_run_delivers_through_keyless_microsoft_and_google_with_nothing_secret_stored(run):
    out = run.stdout
    integrations = section(out, "▸ Integrations")
    for integration, kind in (("m365-keyless", "federated"), ("workspace-keyless", "workload_identity")):
        line = next(line for line in integrations.splitlines() if f" {integration}: {kind} = " in line)
        assert line.rstrip().endswith("no secret, key or token"), line
        assert "✓" in line
    deliveries = section(out, "▸ Deliveries")
    for message, integration in (("notice-5150", "m365-keyless"), ("digest-12", "workspace-keyless")):
        assert re.search(rf"{message}\s+{integration}\s+sent\s+1\s+250 2\.0\.0 OK", deliveries), deliveries
