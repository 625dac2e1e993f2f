"""The keeper function: one run over every integration per scheduled event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailbroker import runtime
from mailbroker.observability import logger, metrics
from mailbroker.settings import KeeperSettings, get_settings

if TYPE_CHECKING:
    from mailbroker.keeper import Checked, Keeper
    from mailbroker.seams import TokenKeeper


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Run the keeper once; answer the summary ``{checked, healthy, refreshed, unhealthy, alerts}``."""
    settings = get_settings(KeeperSettings)
    logger.info("keeper run started", extra={"source": (event or {}).get("source")})
    summary = build_keeper(settings).run()
    metrics.add_metric(name="IntegrationsChecked", unit="Count", value=len(summary.checked))
    metrics.add_metric(name="IntegrationsUnhealthy", unit="Count", value=len(summary.unhealthy))
    metrics.add_metric(name="RefreshTokensExercised", unit="Count", value=len(summary.refreshed))
    metrics.add_metric(name="AlertsPublished", unit="Count", value=summary.alerts)
    return summary.to_dict()


def build_keeper(
    settings: KeeperSettings,
    *,
    broker: TokenKeeper | None = None,
    clock: Callable[[], float] = time.time,
) -> Keeper:
    """The keeper over the environment's integrations; ``broker`` and ``clock`` replace the real
    ones (tests run it at chosen moments)."""
    from mailbroker.keeper import Keeper, live_smtp_check

    tokens = broker or runtime.token_broker()
    return Keeper(
        runtime.integration_store(),
        tokens,
        runtime.health_store(settings),
        runtime.alerts(settings),
        keep_alive_days=settings.keep_alive_days,
        secret_expiry_warning_days=settings.secret_expiry_warning_days,
        smtp_check=lambda integration: live_smtp_check(integration, tokens),
        on_checked=integration_metrics,
        clock=clock,
    )


def integration_metrics(checked: Checked) -> None:
    """One EMF record per integration, with the integration as its dimension."""
    from aws_lambda_powertools.metrics import EphemeralMetrics

    record = checked.record
    per_integration = EphemeralMetrics()
    per_integration.add_dimension(name="integration", value=record.integration)
    per_integration.add_metric(name="IntegrationHealthy", unit="Count", value=1 if record.healthy else 0)
    per_integration.add_metric(
        name="RefreshTokenExercised", unit="Count", value=1 if checked.observation.refreshed else 0
    )
    per_integration.add_metric(name="ConsecutiveFailures", unit="Count", value=record.consecutive_failures)
    if record.token_expires_at is not None:
        per_integration.add_metric(
            name="TokenSecondsLeft", unit="Seconds", value=max(record.token_expires_at - record.checked_at, 0)
        )
    try:
        per_integration.flush_metrics()
    except Exception:
        logger.warning("integration metrics not emitted", extra={"integration": record.integration})
