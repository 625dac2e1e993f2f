"""``mailbroker local``: the sandbox kept up in its own process, its HTTP API on a loopback port
answering as API Gateway would, the send queue consumed as the event source mapping would, and a
clean stop on Ctrl-C."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request

import pytest

from tests.fixtures.processes import child, printed_json, sandbox_env


def call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback URL
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


@pytest.fixture
def local(tmp_path):
    command = [sys.executable, "-m", "mailbroker_cli.main", "local", "--json"]
    with child(command, env=sandbox_env(tmp_path)) as started:
        info = started.read_until(printed_json, 60, "ready line from mailbroker local")
        started.descendants("mailbroker_sandbox.moto_atomic")  # killed with it if the test fails
        yield started.process, info


def test_local_serves_the_http_api_and_delivers_queued_mail_until_interrupted(local):
    process, info = local
    api = info["http_api"]

    token_status, token = call(f"{api}/v1/integrations/support-m365/token", "POST")
    queued_status, queued = call(
        f"{api}/v1/messages",
        "POST",
        {"integration": "support-gmail", "id": "local-1", "from": "ana@gmail.example",
         "to": ["you@example.com"], "subject": "Hello", "text": "It works."},
    )  # fmt: skip
    deadline = time.monotonic() + 20
    record: dict = {}
    while time.monotonic() < deadline and record.get("status") != "sent":
        _, record = call(f"{api}/v1/messages/local-1")
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    code = process.wait(30)

    assert token_status == 200 and token["token_type"] == "Bearer"
    assert token["access_token"] and token["expires_at"] > time.time()
    assert queued_status == 202 and queued == {"id": "local-1", "status": "queued"}
    assert record["status"] == "sent" and record["reply"].startswith("250 2.0.0 OK")
    assert code == 0
    assert set(info["integrations"]) >= {
        "support-m365",
        "support-gmail",
        "billing-ws",
        "relay-oauth2",
        "relay",
    }
    assert info["environment"]["SEND_QUEUE_URL"].startswith("http://127.0.0.1:")
