"""``mailbroker local``: the sandbox kept up in its own process, its HTTP API on a loopback port
answering as API Gateway would, the send queue consumed as the event source mapping would, and a
clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback URL
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


@pytest.fixture
def local():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "mailbroker_cli.main", "local", "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    text = ""
    deadline = time.monotonic() + 60
    info = None
    while info is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        text += line
        try:
            info = json.loads(text)
        except ValueError:
            continue
    if info is None:
        process.kill()
        pytest.fail(f"mailbroker local did not start: {text}{process.stderr.read()}")
    yield process, info
    if process.poll() is None:
        process.kill()
        process.wait(10)


def test_local_serves_the_http_api_and_delivers_queued_mail_until_interrupted(local):
    process, info = local
    api = info["http_api"]

    token_status, token = call(f"{api}/v1/integrations/m365/token", "POST")
    queued_status, queued = call(
        f"{api}/v1/messages",
        "POST",
        {"integration": "gmail", "id": "local-1", "from": "ana@gmail.example", "to": ["you@example.com"],
         "subject": "Hello", "text": "It works."},
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
    assert set(info["integrations"]) >= {"m365", "gmail", "workspace", "relay-oauth2", "relay-basic"}
    assert info["environment"]["SEND_QUEUE_URL"].startswith("http://127.0.0.1:")
