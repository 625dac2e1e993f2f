"""Wiring for one execution environment: AWS clients and domain objects, built lazily on first
use and kept for the environment's life. Handlers call these; domain code receives what they
build. Nothing here runs at import time."""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any

from mailbroker.settings import Settings, get_settings


@cache
def aws_client(service: str) -> Any:
    """A boto3 client with short timeouts and standard retries. ``AWS_ENDPOINT_URL`` (boto3's own
    variable) points every client at a local emulator."""
    import boto3
    from botocore.config import Config

    from mailbroker.observability import trace_library

    trace_library("botocore")

    config = Config(connect_timeout=3, read_timeout=10, retries={"mode": "standard", "max_attempts": 4})
    return boto3.client(service, config=config)


@lru_cache(maxsize=1)
def integration_store() -> Any:
    from mailbroker.integrations import IntegrationStore

    settings = get_settings()
    return IntegrationStore(
        aws_client("secretsmanager"), settings.secret_prefix, max_age=settings.secret_max_age
    )


@lru_cache(maxsize=1)
def token_broker() -> Any:
    return build_token_broker(get_settings(), integration_store())


def build_token_broker(settings: Settings, integrations: Any, **overrides: Any) -> Any:
    from mailbroker.tokens.broker import TokenBroker
    from mailbroker.tokens.crypto import TokenCipher
    from mailbroker.tokens.model import RefreshPolicy
    from mailbroker.tokens.providers import TokenProviders
    from mailbroker.tokens.store import TokenStore

    cipher = TokenCipher(overrides.pop("kms", None) or aws_client("kms"), settings.token_key_id)
    store = TokenStore(
        overrides.pop("dynamodb", None) or aws_client("dynamodb"), settings.token_table, cipher
    )
    return TokenBroker(
        integrations,
        store,
        overrides.pop("providers", None) or TokenProviders(http_timeout=settings.http_timeout),
        policy=RefreshPolicy(min_margin=settings.refresh_min_margin, fraction=settings.refresh_fraction),
        lease_ttl=settings.lease_ttl,
        lease_wait=settings.lease_wait,
        **overrides,
    )


def reset() -> None:
    """Forget every cached client and object (tests change the environment between cases)."""
    get_settings.cache_clear()
    aws_client.cache_clear()
    integration_store.cache_clear()
    token_broker.cache_clear()
