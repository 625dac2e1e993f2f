"""Each function's settings: a variable it needs that is missing or empty fails at the start of the
handler, with a message naming it, before any AWS call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mailbroker import runtime
from mailbroker.handlers import keeper, sender, token_broker
from mailbroker.settings import (
    FUNCTION_SETTINGS,
    EventPublisherSettings,
    KeeperSettings,
    SenderSettings,
    SettingsError,
    TokenBrokerSettings,
    TrackingSettings,
)

from mailbroker_sandbox.aws import load_template

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
TEMPLATE = load_template(ROOT / "template.yaml")
FUNCTION_IDS = {
    TokenBrokerSettings: "TokenBrokerFunction",
    SenderSettings: "SenderFunction",
    KeeperSettings: "KeeperFunction",
    EventPublisherSettings: "EventPublisherFunction",
    TrackingSettings: "TrackingFunction",
}
COMPLETE = {
    "SECRET_PREFIX": "mailbroker/",
    "TOKEN_TABLE": "mailbroker-tokens",
    "MESSAGE_TABLE": "mailbroker-messages",
    "TOKEN_KEY_ID": "alias/mailbroker-tokens",
    "SEND_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/mailbroker-send",
    "DEAD_LETTER_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/mailbroker-dlq",
    "ALERT_TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:mailbroker-alerts",
}


def required(model: type) -> set[str]:
    return {field.alias for field in model.model_fields.values() if field.is_required()}


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch):
    """A process environment with no AWS region or credentials (an AWS call would fail with a
    different error) and exactly the variables the test sets."""
    for name in [*COMPLETE, "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL"]:
        monkeypatch.delenv(name, raising=False)
    runtime.reset()

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        runtime.reset()

    yield set_env
    runtime.reset()


def event(name: str) -> Any:
    return json.loads((EVENTS / name).read_text())


@pytest.mark.parametrize(
    ("handle", "sample", "missing"),
    [
        (sender.handle, "sqs_batch.json", "DEAD_LETTER_QUEUE_URL"),
        (sender.handle, "sqs_batch.json", "MESSAGE_TABLE"),
        (keeper.handle, "schedule.json", "ALERT_TOPIC_ARN"),
        (token_broker.handle, "token_direct_invoke.json", "TOKEN_KEY_ID"),
        (token_broker.handle, "http_get_message.json", "SEND_QUEUE_URL"),
    ],
)
def test_a_missing_variable_fails_the_handler_at_start_naming_it(environment, handle, sample, missing):
    environment(**{name: value for name, value in COMPLETE.items() if name != missing})

    with pytest.raises(SettingsError) as caught:
        handle(event(sample), None)

    assert caught.value.variables == [missing]
    assert f"{missing} is not set" in str(caught.value)


def test_an_empty_or_blank_variable_is_refused_as_empty(environment):
    environment(**{**COMPLETE, "TOKEN_TABLE": "", "SEND_QUEUE_URL": "   "})

    with pytest.raises(SettingsError) as caught:
        sender.handle(event("sqs_batch.json"), None)

    assert sorted(caught.value.variables) == ["SEND_QUEUE_URL", "TOKEN_TABLE"]
    assert "TOKEN_TABLE is empty" in str(caught.value) and "SEND_QUEUE_URL is empty" in str(caught.value)


def test_a_malformed_tunable_is_named_without_repeating_its_value(environment):
    environment(**{**COMPLETE, "IDEMPOTENCY_HOURS": "-7.25", "KEEP_ALIVE_DAYS": "weekly"})

    with pytest.raises(SettingsError) as caught:
        KeeperSettings.from_env({**COMPLETE, "KEEP_ALIVE_DAYS": "weekly"})
    with pytest.raises(SettingsError) as sender_caught:
        sender.handle(event("sqs_batch.json"), None)

    assert caught.value.variables == ["KEEP_ALIVE_DAYS"] and "weekly" not in str(caught.value)
    assert sender_caught.value.variables == ["IDEMPOTENCY_HOURS"] and "7.25" not in str(sender_caught.value)


def test_every_variable_missing_is_named_at_once():
    with pytest.raises(SettingsError) as caught:
        SenderSettings.from_env({})

    assert sorted(caught.value.variables) == sorted(required(SenderSettings))
    assert str(caught.value).startswith("SenderSettings cannot start: ")


def test_a_complete_environment_parses_with_names_stripped_and_defaults_for_tunables():
    settings = TokenBrokerSettings.from_env({**COMPLETE, "TOKEN_TABLE": " mailbroker-tokens "})

    assert settings.token_table == "mailbroker-tokens"
    assert (settings.idempotency_hours, settings.secret_max_age, settings.token_principals) == (
        24.0,
        60,
        frozenset(),
    )


@pytest.mark.parametrize("model", FUNCTION_SETTINGS, ids=lambda m: m.__name__)
def test_the_template_sets_every_variable_each_function_requires(model):
    function_id = FUNCTION_IDS[model]
    variables = set(TEMPLATE["Globals"]["Function"]["Environment"]["Variables"])
    function = TEMPLATE["Resources"][function_id]["Properties"]
    variables |= set(function.get("Environment", {}).get("Variables", {}))

    assert required(model) <= variables, f"{function_id} lacks {sorted(required(model) - variables)}"


def test_names_are_required_and_tunables_are_not():
    assert required(SenderSettings) == {
        "TOKEN_TABLE",
        "TOKEN_KEY_ID",
        "MESSAGE_TABLE",
        "SEND_QUEUE_URL",
        "DEAD_LETTER_QUEUE_URL",
    }
    assert required(KeeperSettings) == {"TOKEN_TABLE", "TOKEN_KEY_ID", "ALERT_TOPIC_ARN"}
    assert required(TokenBrokerSettings) == {"TOKEN_TABLE", "TOKEN_KEY_ID", "MESSAGE_TABLE", "SEND_QUEUE_URL"}


def test_idle_smtp_sessions_default_under_exchanges_ten_minutes_and_can_be_set_or_turned_off():
    assert SenderSettings.from_env(COMPLETE).smtp_idle_seconds == 240.0
    assert SenderSettings.from_env({**COMPLETE, "SMTP_IDLE_SECONDS": "90"}).smtp_idle_seconds == 90.0
    assert SenderSettings.from_env({**COMPLETE, "SMTP_IDLE_SECONDS": "0"}).smtp_idle_seconds == 0.0
    for beyond in ("601", "-1", "soon"):
        with pytest.raises(SettingsError) as caught:
            SenderSettings.from_env({**COMPLETE, "SMTP_IDLE_SECONDS": beyond})
        assert "SMTP_IDLE_SECONDS" in str(caught.value)
    template = TEMPLATE["Parameters"]["SmtpIdleSeconds"]
    assert (template["Default"], template["MaxValue"]) == (240, 600)
    sender = TEMPLATE["Resources"]["SenderFunction"]["Properties"]["Environment"]["Variables"]
    assert sender["SMTP_IDLE_SECONDS"] == {"Ref": "SmtpIdleSeconds"}
