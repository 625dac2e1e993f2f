"""Function settings: a typed model parsed once, lazily, from the environment the template sets.

Domain code receives values from these models; it never reads ``os.environ`` itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    """Everything any function reads from its environment (DESIGN.md, "Environment")."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    secret_prefix: str = Field(default="mailbroker/", alias="SECRET_PREFIX")
    token_table: str = Field(default="", alias="TOKEN_TABLE")
    message_table: str = Field(default="", alias="MESSAGE_TABLE")
    send_queue_url: str = Field(default="", alias="SEND_QUEUE_URL")
    dead_letter_queue_url: str = Field(default="", alias="DEAD_LETTER_QUEUE_URL")
    alert_topic_arn: str = Field(default="", alias="ALERT_TOPIC_ARN")
    # The stack's KMS key for envelope encryption of cached tokens (an id, ARN or alias).
    token_key_id: str = Field(default="", alias="TOKEN_KEY_ID")
    # IAM principals (role or user ARNs, comma-separated) allowed to call the token route over
    # HTTP; empty: any IAM-authenticated caller the API's IAM authorisation lets through.
    token_api_principals: str = Field(default="", alias="TOKEN_API_PRINCIPALS")
    # Seconds an integration's secret stays cached in memory.
    secret_max_age: int = Field(default=60, alias="SECRET_MAX_AGE_SECONDS", ge=0)
    # Refresh ahead when less than max(min margin, fraction x lifetime) remains.
    refresh_min_margin: float = Field(default=600.0, alias="TOKEN_REFRESH_MIN_MARGIN_SECONDS", ge=0)
    refresh_fraction: float = Field(default=0.15, alias="TOKEN_REFRESH_FRACTION", ge=0, le=0.9)
    # How long a caller waits for another environment's refresh before giving up.
    lease_wait: float = Field(default=8.0, alias="TOKEN_LEASE_WAIT_SECONDS", gt=0)
    # A refresh lease whose holder died expires after this many seconds.
    lease_ttl: float = Field(default=15.0, alias="TOKEN_LEASE_TTL_SECONDS", gt=0)
    # Token endpoint HTTP timeout.
    http_timeout: float = Field(default=10.0, alias="TOKEN_HTTP_TIMEOUT_SECONDS", gt=0)
    # Sender: idempotency window and maximum age of a retried message.
    idempotency_hours: float = Field(default=24.0, alias="IDEMPOTENCY_HOURS", gt=0)
    max_message_age_hours: float = Field(default=24.0, alias="MAX_MESSAGE_AGE_HOURS", gt=0)
    # Keeper: exercise every refresh token at least this often.
    keep_alive_days: float = Field(default=7.0, alias="KEEP_ALIVE_DAYS", gt=0)
    secret_expiry_warning_days: float = Field(default=30.0, alias="SECRET_EXPIRY_WARNING_DAYS", gt=0)

    @property
    def token_principals(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.token_api_principals.split(",") if p.strip())

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls.model_validate(dict(env))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this execution environment, parsed on first use."""
    return Settings.from_env(os.environ)
