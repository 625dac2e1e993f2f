"""Function settings: typed models parsed once, lazily, from the environment the template sets.

Each function has its own model, composed from small mixins, one per thing it talks to (the
secrets, the token cache, the message table, the queues, the alert topic). A name the function
needs (a table, queue, topic or key) is a required, non-empty field: a variable that is missing or
empty fails at the start of the handler with a :class:`SettingsError` that names it, instead of
later as a confusing boto error. Tunables keep their defaults.

Domain code receives values from these models; it never reads ``os.environ`` itself. The variable
names are a contract with template.yaml (see docs/design.md, "Environment").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

# A resource name or URL the function cannot work without: surrounding blanks are not a name.
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class EnvModel(BaseModel):
    """A model read from environment variables: fields are filled by their alias (the variable),
    unknown variables are ignored, and the parsed values never change."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Self:
        """Parse ``env``; a missing, empty or malformed variable raises :class:`SettingsError`."""
        try:
            return cls.model_validate(dict(env))
        except ValidationError as exc:
            raise SettingsError.from_validation(cls, exc) from None


class SettingsError(ValueError):
    """The environment lacks a variable the function needs, or holds one it cannot use. The message
    names every such variable and never repeats a value."""

    def __init__(self, model: str, problems: list[str], variables: list[str]) -> None:
        super().__init__(f"{model}: {'; '.join(problems)} (set by template.yaml; see docs/design.md)")
        self.model = model
        self.problems = problems
        self.variables = variables

    @classmethod
    def from_validation(cls, model: type[EnvModel], exc: ValidationError) -> SettingsError:
        problems, variables = [], []
        for error in exc.errors(include_input=False, include_url=False):
            variable = ".".join(str(part) for part in error["loc"]) or "(environment)"
            variables.append(variable)
            if error["type"] == "missing":
                problems.append(f"{variable} is not set")
            elif error["type"] == "string_too_short":
                problems.append(f"{variable} is empty")
            else:
                problems.append(f"{variable} is invalid: {error['msg']}")
        return cls(f"{model.__name__} cannot start", problems, variables)


# --- mixins: one per thing a function talks to ----------------------------------------------------


class SecretsEnv(EnvModel):
    """Where the integrations' secrets live in Secrets Manager."""

    secret_prefix: Name = Field(default="mailbroker/", alias="SECRET_PREFIX")
    # Seconds an integration's secret stays cached in memory.
    secret_max_age: int = Field(default=60, alias="SECRET_MAX_AGE_SECONDS", ge=0)


class TokenPolicyEnv(EnvModel):
    """How tokens are refreshed: tunables only, so the CLI and the benchmarks can read them too."""

    # Refresh ahead when less than max(min margin, fraction x lifetime) remains.
    refresh_min_margin: float = Field(default=600.0, alias="TOKEN_REFRESH_MIN_MARGIN_SECONDS", ge=0)
    refresh_fraction: float = Field(default=0.15, alias="TOKEN_REFRESH_FRACTION", ge=0, le=0.9)
    # How long a caller waits for another environment's refresh before giving up.
    lease_wait: float = Field(default=8.0, alias="TOKEN_LEASE_WAIT_SECONDS", gt=0)
    # A refresh lease whose holder died expires after this many seconds.
    lease_ttl: float = Field(default=15.0, alias="TOKEN_LEASE_TTL_SECONDS", gt=0)
    # A rotated refresh token is written back to the integration's secret at most this often
    # (Secrets Manager's guidance: no more than one PutSecretValue every ten minutes).
    refresh_token_write_back: float = Field(default=600.0, alias="REFRESH_TOKEN_WRITE_BACK_SECONDS", ge=0)
    # Token endpoint HTTP timeout.
    http_timeout: float = Field(default=10.0, alias="TOKEN_HTTP_TIMEOUT_SECONDS", gt=0)


class TokenTableEnv(EnvModel):
    """The table of cached tokens and the keeper's health records."""

    token_table: Name = Field(alias="TOKEN_TABLE")


class TokenCacheEnv(TokenTableEnv, TokenPolicyEnv):
    """The shared token cache and its envelope-encryption key."""

    # The stack's KMS key for envelope encryption of cached tokens (an id, ARN or alias).
    token_key_id: Name = Field(alias="TOKEN_KEY_ID")


class MessageWindowEnv(EnvModel):
    """How long a message id is remembered: one id is delivered at most once in this window."""

    idempotency_hours: float = Field(default=24.0, alias="IDEMPOTENCY_HOURS", gt=0)


class MessageTableEnv(MessageWindowEnv):
    """The message status records (and the send governor's counters)."""

    message_table: Name = Field(alias="MESSAGE_TABLE")


class SendQueueEnv(EnvModel):
    """The queue messages are posted to."""

    send_queue_url: Name = Field(alias="SEND_QUEUE_URL")


class DeadLetterEnv(EnvModel):
    """Where failed messages go, and how long a retried message may keep trying."""

    dead_letter_queue_url: Name = Field(alias="DEAD_LETTER_QUEUE_URL")
    max_message_age_hours: float = Field(default=24.0, alias="MAX_MESSAGE_AGE_HOURS", gt=0)


class AlertsEnv(EnvModel):
    """The keeper's alert topic and its schedule of checks."""

    alert_topic_arn: Name = Field(alias="ALERT_TOPIC_ARN")
    # Exercise every refresh token at least this often.
    keep_alive_days: float = Field(default=7.0, alias="KEEP_ALIVE_DAYS", gt=0)
    secret_expiry_warning_days: float = Field(default=30.0, alias="SECRET_EXPIRY_WARNING_DAYS", gt=0)


class TokenApiEnv(EnvModel):
    """Who may fetch tokens over HTTP."""

    # IAM principals (role or user ARNs, unique ids or account ids, comma-separated) allowed to
    # take every integration's token over HTTP. Anyone else needs to be in the integration's own
    # allowed_callers; empty: nobody but those.
    token_api_principals: str = Field(default="", alias="TOKEN_API_PRINCIPALS")

    @property
    def token_principals(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.token_api_principals.split(",") if p.strip())


class TrackingLinksEnv(EnvModel):
    """Open and click tracking, as the sender writes it: the KMS HMAC key that signs the links and
    the public base URL they point at. Empty: the sender tracks nothing (and says so)."""

    tracking_key_id: str = Field(default="", alias="TRACKING_KEY_ID")
    tracking_base_url: str = Field(default="", alias="TRACKING_BASE_URL")


class TrackingRoutesEnv(MessageTableEnv):
    """Open and click tracking, as the tracking routes verify and count it."""

    tracking_key_id: Name = Field(alias="TRACKING_KEY_ID")
    # A hit this soon after the message was sent is taken for a scanner's at the receiving end.
    tracking_machine_window: float = Field(default=10.0, alias="TRACKING_MACHINE_WINDOW_SECONDS", ge=0)


class EventBusEnv(EnvModel):
    """The EventBridge bus that receives delivery events (the account's default bus by default)."""

    event_bus_name: Name = Field(default="default", alias="EVENT_BUS_NAME")


class ApiSenderEnv(EnvModel):
    """The sender's trust in messages the HTTP API queued."""

    # The token broker's role id: POST /v1/messages checked the caller against the integration's
    # allowed_callers before queuing, so a message whose SenderId is this role passes.
    api_sender_role_id: str = Field(default="", alias="API_SENDER_ROLE_ID")


# --- one model per function ---------------------------------------------------------------------


class TokenBrokerSettings(SecretsEnv, TokenCacheEnv, MessageTableEnv, SendQueueEnv, TokenApiEnv):
    """The token broker: tokens by direct invoke, and the HTTP API (tokens, messages, health)."""


class SenderSettings(
    SecretsEnv, TokenCacheEnv, MessageTableEnv, SendQueueEnv, DeadLetterEnv, TrackingLinksEnv, ApiSenderEnv
):
    """The sender: SQS batches in, SMTP out, status records and the dead-letter queue."""

    # How long an authenticated SMTP session stays open in a warm execution environment between
    # invocations (0: closed at the end of each batch). Under the servers' own idle timeouts
    # (Exchange Online about 10 minutes, Gmail less); it is also the longest an idle session
    # holds one of the mailbox's connection slots.
    smtp_idle_seconds: float = Field(default=240.0, alias="SMTP_IDLE_SECONDS", ge=0, le=600)


class KeeperSettings(SecretsEnv, TokenCacheEnv, AlertsEnv):
    """The keeper: every integration's token and health, alerts on the topic."""


class EventPublisherSettings(EventBusEnv):
    """The event publisher: the tables' streams in, delivery events on the bus."""


class TrackingSettings(TrackingRoutesEnv):
    """The tracking function: the open image and click redirects of tracked mail."""


FUNCTION_SETTINGS: tuple[type[EnvModel], ...] = (
    TokenBrokerSettings,
    SenderSettings,
    KeeperSettings,
    EventPublisherSettings,
    TrackingSettings,
)


M = TypeVar("M", bound=EnvModel)

_parsed: dict[type[EnvModel], EnvModel] = {}


def get_settings(model: type[M]) -> M:
    """``model`` parsed from this execution environment on first use, then kept."""
    parsed = _parsed.get(model)
    if not isinstance(parsed, model):
        parsed = _parsed[model] = model.from_env(os.environ)
    return parsed


def forget_settings() -> None:
    """Parse again on next use (tests change the environment between cases)."""
    _parsed.clear()
