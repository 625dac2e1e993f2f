"""The composition root: every AWS client, store and queue is built here and nowhere else.

Handlers, API routes, the CLI and the sandbox call these factories; domain code receives what
they build. Each factory takes the settings mixin it needs (see :mod:`mailbroker.settings`), so
the CLI can hand in values it read from a stack's outputs. What is built for the execution
environment (clients, the integration store, the token broker) is built lazily on first use and
kept for the environment's life. Nothing here runs at import time, and the domain modules are
imported inside the factories so a handler's cold start loads only what its first call needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from mailbroker.settings import SecretsEnv, TokenCacheEnv, forget_settings, get_settings

if TYPE_CHECKING:
    from mailbroker.events import EventPublisher
    from mailbroker.governor import SendGovernor
    from mailbroker.health import HealthStore, SnsAlerts
    from mailbroker.integrations import IntegrationStore
    from mailbroker.messages.engagement import EngagementStore
    from mailbroker.messages.queue import MessageQueue, QueueActions
    from mailbroker.messages.sessions import IdleSessions
    from mailbroker.messages.status import MessageStatusStore
    from mailbroker.messages.tracking import LinkTracker, TrackingSigner
    from mailbroker.seams import IntegrationSource
    from mailbroker.settings import (
        AlertsEnv,
        EventBusEnv,
        MessageTableEnv,
        SenderSettings,
        SendQueueEnv,
        TokenTableEnv,
        TrackingLinksEnv,
        TrackingRoutesEnv,
    )
    from mailbroker.tokens.broker import TokenBroker
    from mailbroker.tokens.providers import TokenProviders


@cache
def aws_client(service: str) -> Any:
    """A boto3 client with short timeouts and standard retries. ``AWS_ENDPOINT_URL`` (boto3's own
    variable) points every client at a local emulator. (boto3 clients are generated at run time:
    there is no static type to give.)"""
    import boto3
    from botocore.config import Config

    from mailbroker.observability import trace_library

    trace_library("botocore")

    config = Config(connect_timeout=3, read_timeout=10, retries={"mode": "standard", "max_attempts": 4})
    return boto3.client(service, config=config)


def sts_client() -> Any:
    """STS on the regional endpoint, always: ``GetWebIdentityToken`` is not served by the global
    one. boto3 picks the regional endpoint by default; a configuration that says ``legacy`` (or an
    old default) gets the regional URL explicitly. ``AWS_ENDPOINT_URL_STS`` / ``AWS_ENDPOINT_URL``
    still point it at a stand-in."""
    client = aws_client("sts")
    if client.meta.endpoint_url.rstrip("/") == "https://sts.amazonaws.com":
        import boto3

        region = client.meta.region_name or "us-east-1"
        client = boto3.client("sts", region_name=region, endpoint_url=f"https://sts.{region}.amazonaws.com")
    return client


# --- kept for the execution environment's life ----------------------------------------------------


@lru_cache(maxsize=1)
def integration_store() -> IntegrationStore:
    return build_integration_store(get_settings(SecretsEnv))


@lru_cache(maxsize=1)
def token_broker() -> TokenBroker:
    return build_token_broker(get_settings(TokenCacheEnv), integration_store())


_idle_sessions: dict[float, IdleSessions] = {}
# What the sender's governor last learned of each message bucket, across invocations.
_known_tats: dict[tuple[str, str], int] = {}


def idle_sessions(idle_seconds: float) -> IdleSessions:
    """The SMTP sessions the sender's execution environment keeps open between invocations."""
    from mailbroker.messages.sessions import IdleSessions

    if idle_seconds not in _idle_sessions:
        _idle_sessions[idle_seconds] = IdleSessions(idle_seconds)
    return _idle_sessions[idle_seconds]


# --- built from the settings they are given -----------------------------------------------------


def build_integration_store(settings: SecretsEnv, *, max_age: int | None = None) -> IntegrationStore:
    """The integrations' secrets; ``max_age=0`` reads every secret afresh (the CLI)."""
    from mailbroker.integrations import IntegrationStore

    return IntegrationStore(
        aws_client("secretsmanager"),
        settings.secret_prefix,
        max_age=settings.secret_max_age if max_age is None else max_age,
    )


def build_token_broker(
    settings: TokenCacheEnv,
    integrations: IntegrationSource,
    *,
    providers: TokenProviders | None = None,
    clock: Callable[[], float] = time.time,
) -> TokenBroker:
    """The token broker over the shared cache; ``providers`` and ``clock`` replace the real ones
    (benchmarks and tests)."""
    from mailbroker.tokens.broker import TokenBroker
    from mailbroker.tokens.crypto import TokenCipher
    from mailbroker.tokens.model import RefreshPolicy
    from mailbroker.tokens.providers import TokenProviders
    from mailbroker.tokens.store import TokenStore
    from mailbroker.tokens.web_identity import WebIdentityTokens

    cipher = TokenCipher(aws_client("kms"), settings.token_key_id)
    return TokenBroker(
        integrations,
        TokenStore(aws_client("dynamodb"), settings.token_table, cipher),
        providers
        or TokenProviders(http_timeout=settings.http_timeout, web_identity=WebIdentityTokens(sts_client)),
        policy=RefreshPolicy(min_margin=settings.refresh_min_margin, fraction=settings.refresh_fraction),
        lease_ttl=settings.lease_ttl,
        lease_wait=settings.lease_wait,
        clock=clock,
        write_back_interval=settings.refresh_token_write_back,
    )


def status_store(settings: MessageTableEnv) -> MessageStatusStore:
    """The message status records, remembered for the idempotency window."""
    from mailbroker.messages.status import MessageStatusStore

    return MessageStatusStore(
        aws_client("dynamodb"), settings.message_table, window_seconds=settings.idempotency_hours * 3600
    )


def message_queue(
    queue: SendQueueEnv, statuses: MessageStatusStore, integrations: IntegrationSource
) -> MessageQueue:
    """Validate and enqueue messages onto the send queue, recording each as queued."""
    from mailbroker.messages.queue import MessageQueue

    return MessageQueue(aws_client("sqs"), queue.send_queue_url, statuses, integrations)


def queue_actions(settings: SenderSettings) -> QueueActions:
    """What the sender does to a record: delay it, or move it to the dead-letter queue."""
    from mailbroker.messages.queue import QueueActions

    return QueueActions(aws_client("sqs"), settings.send_queue_url, settings.dead_letter_queue_url)


def send_governor(settings: MessageTableEnv) -> SendGovernor:
    """Per-integration pace and connection slots, shared by every sender."""
    from mailbroker.governor import SendGovernor

    return SendGovernor(aws_client("dynamodb"), settings.message_table, known_tats=_known_tats)


def health_store(settings: TokenTableEnv) -> HealthStore:
    """The keeper's health records (kept in the token table)."""
    from mailbroker.health import HealthStore

    return HealthStore(aws_client("dynamodb"), settings.token_table)


def alerts(settings: AlertsEnv) -> SnsAlerts:
    """The keeper's alerts, published on the stack's topic."""
    from mailbroker.health import SnsAlerts

    return SnsAlerts(aws_client("sns"), settings.alert_topic_arn)


def event_publisher(settings: EventBusEnv) -> EventPublisher:
    """Puts delivery events on the stack's bus."""
    from mailbroker.events import EventPublisher

    return EventPublisher(aws_client("events"), settings.event_bus_name)


def link_tracker(settings: TrackingLinksEnv) -> LinkTracker | None:
    """Signs tracked mail's links with the stack's HMAC key; None when the template gave none."""
    from mailbroker.messages.tracking import LinkTracker, TrackingSigner

    if not (settings.tracking_key_id and settings.tracking_base_url):
        return None
    return LinkTracker(
        TrackingSigner(aws_client("kms"), settings.tracking_key_id), settings.tracking_base_url
    )


def tracking_signer(settings: TrackingRoutesEnv) -> TrackingSigner:
    """Verifies the tokens of tracked links."""
    from mailbroker.messages.tracking import TrackingSigner

    return TrackingSigner(aws_client("kms"), settings.tracking_key_id)


def engagement_store(settings: TrackingRoutesEnv) -> EngagementStore:
    """Opens and clicks, counted on the status records."""
    from mailbroker.messages.engagement import EngagementStore

    return EngagementStore(
        aws_client("dynamodb"), settings.message_table, too_soon_seconds=settings.tracking_machine_window
    )


def reset() -> None:
    """Forget every cached client, object and parsed setting (tests change the environment
    between cases)."""
    forget_settings()
    for parked in _idle_sessions.values():
        for entry in parked.drop_all():  # their slots' leases lapse by themselves
            entry.session.close()
    _idle_sessions.clear()
    aws_client.cache_clear()
    integration_store.cache_clear()
    token_broker.cache_clear()
