"""A sender's claims and connection slots last its invocation plus a margin, no longer."""

from __future__ import annotations

import pytest
from mailbroker import runtime
from mailbroker.handlers.sender import LEASE_MARGIN_SECONDS, build_delivery
from mailbroker.settings import SenderSettings

from tests.fixtures.events import LambdaContext


@pytest.fixture
def settings(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env = {
        "MESSAGE_TABLE": "messages",
        "TOKEN_TABLE": "tokens",
        "TOKEN_KEY_ID": "alias/mailbroker",
        "SEND_QUEUE_URL": "q",
        "DEAD_LETTER_QUEUE_URL": "d",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    yield SenderSettings.from_env(env)
    runtime.reset()


def test_claims_outlive_the_invocation_by_the_margin_only(settings):
    delivery = build_delivery(settings, LambdaContext(remaining_ms=90_000))

    assert delivery.lease_seconds == pytest.approx(90 + LEASE_MARGIN_SECONDS)
    assert delivery.sessions._lease_seconds == delivery.lease_seconds
