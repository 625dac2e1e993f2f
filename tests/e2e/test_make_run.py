"""``make run`` from the outside: ``python -m mailbroker_sandbox.run`` as a subprocess, read the way a
newcomer reads it, and nothing it started left running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run() -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    }
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "mailbroker_sandbox.run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return completed, time.monotonic() - started


def section(out: str, title: str) -> str:
    """The lines of one "▸" section of the output."""
    start = out.index(title)
    following = out.find("▸", start + len(title))
    return out[start : following if following != -1 else len(out)]


@pytest.mark.xdist_group("make-run")
@pytest.mark.timeout(150)
def test_make_run_completes_within_a_minute(run):
    completed, elapsed = run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert elapsed < 60
    assert "Everything it started has stopped." in completed.stdout
    assert "Traceback" not in completed.stderr


@pytest.mark.xdist_group("make-run")
def test_make_run_prints_a_redacted_token_for_each_oauth_provider(run):
    out = section(run[0].stdout, "▸ Tokens")
    for integration in ("support-m365", "support-gmail", "billing-ws", "relay-oauth2"):
        line = next(line for line in out.splitlines() if line.strip().startswith(integration + " "))
        assert re.search(r"…\[\d+ chars, sha256 [0-9a-f]{8}\]\s+\d+ s\s+provider\s+memory", line), line
    assert "gmail-revoked  ✗ token_invalid_grant" in out


@pytest.mark.xdist_group("make-run")
def test_make_run_shows_deliveries_with_server_replies_and_the_failure_with_code_and_hint(run):
    out = run[0].stdout
    for message in ("order-8812", "welcome-ana", "receipt-77", "report-q3"):
        assert re.search(rf"{message}\s+\S+\s+sent\s+1\s+250 2\.0\.0 OK <", out), message
    assert re.search(r"alert-disk\s+relay\s+sent\s+2\s+250 2\.0\.0 OK", out)  # throttled once
    assert "invoice-2211 failed for good: send_as_denied" in out
    hint = r"hint: The mailbox \S+ may not send as this 'from' address.*Add-RecipientPermission"
    assert re.search(hint, out)
    assert "dead-letter queue: 1 message(s)" in out


@pytest.mark.xdist_group("make-run")
def test_make_run_drives_the_sender_as_the_event_source_mapping_does(run):
    out = run[0].stdout
    assert re.search(
        r"batch 1: 6 received → 5 deleted, 1 reported in batchItemFailures, retry scheduled", out
    )
    assert "fast-forward" in out
    assert "✓ send queue empty" in out


@pytest.mark.xdist_group("make-run")
def test_make_run_shows_health_alerts_and_token_calls_per_credential(run):
    out = run[0].stdout
    assert "summary: checked 6, healthy 5, refreshed 0, unhealthy 1 (gmail-revoked), alerts 2" in out
    assert re.search(r"gmail-revoked\s+unhealthy\s+.*token_invalid_grant", out)
    assert "mailbroker: gmail-revoked needs re-consent" in out
    assert "run: mailbroker consent google gmail-revoked" in out
    assert "mailbroker: client secret of support-m365 expires" in out
    calls = section(out, "▸ Token calls per credential")
    for integration in ("support-m365", "support-gmail", "billing-ws", "relay-oauth2"):
        assert re.search(rf"^\s+{re.escape(integration)}\s+.+\s1$", calls, re.MULTILINE), integration


@pytest.mark.xdist_group("make-run")
def test_make_run_reads_resources_and_function_settings_from_the_template(run):
    out = run[0].stdout
    assert "tables   mailbroker-TokenTable, mailbroker-MessageTable" in out
    assert re.search(r"SenderFunction\s+90 s\s+SQS batch 10, window 1 s, ReportBatchItemFailures", out)
    assert re.search(
        r"KeeperFunction\s+300 s\s+schedule rate\(1 hour\)\s+ALERT_TOPIC_ARN KEEP_ALIVE_DAYS", out
    )


@pytest.mark.xdist_group("make-run")
def test_make_run_prints_no_credential(run):
    completed = run[0]
    text = completed.stdout + completed.stderr
    assert not re.search(r"eyJ[\w-]{20,}\.[\w-]{20,}", text)  # no whole JWT
    assert not re.search(r"ya29\.[\w-]{20,}", text)
    assert not re.search(r"1//0[\w-]{20,}", text)


@pytest.mark.xdist_group("make-run")
def test_make_run_prints_the_delivery_events_the_rules_sqs_target_received(run):
    out = section(run[0].stdout, "▸ Delivery events")
    for message in ("order-8812", "welcome-ana", "receipt-77", "report-q3"):
        assert re.search(rf"Message Sent\s+{message}\s+sent\s+1\s+\S+\s+250 2\.0\.0 OK <", out), message
    assert re.search(r"Message Failed\s+invoice-2211\s+failed\s+1\s+\S+\s+send_as_denied", out)
    assert re.search(r"Message Retrying\s+alert-disk\s+retrying\s+1\s+\S+\s+throttled", out)
    assert re.search(r"Message Sent\s+alert-disk\s+sent\s+2\s", out)
    assert re.search(
        r"Integration Health Changed\s+gmail-revoked\s+unhealthy\s+\d+\s+\S+\s+token_invalid_grant", out
    )
    assert "8 event(s) on the rule's SQS target" in out
