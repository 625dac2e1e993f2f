"""The keeper: exercise every refresh token, health-check every integration, warn before
credentials die.

For each integration under the secret prefix the keeper obtains a token through the broker (which
pre-warms its cache); for refresh-token credentials it forces a real refresh when the provider last
issued a token more than ``keep_alive_days`` ago, so no refresh token approaches Google's six-month
idle limit; for integrations with ``smtp_check`` it runs the live SMTP check (no mail sent). It
writes one health record per integration and alerts only on transitions: healthy to unhealthy and
back, into ``token_invalid_grant`` (re-consent needed), and into the warning window before a client
secret expires. One integration failing never stops the others.

Two keepers running at once are safe: the broker's lease lets one of them refresh a credential, and
the health record's conditional write lets one of them announce a transition.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailbroker.errors import MailbrokerError, classify_exception
from mailbroker.health import Alert, HealthError, HealthRecord, HealthStore, iso
from mailbroker.integrations import BasicIntegration, MicrosoftDelegatedIntegration, MicrosoftIntegration
from mailbroker.observability import logger

if TYPE_CHECKING:
    import ssl

    from mailbroker.integrations import Integration
    from mailbroker.seams import AlertSink, IntegrationCatalogue, TokenKeeper, TokenSource
    from mailbroker.smtp.transport import CheckStep
    from mailbroker.smtp.xoauth2 import Authenticator

DAY = 86400.0
# How many times a record write is retried after losing to a concurrent keeper.
_WRITE_ATTEMPTS = 5


@dataclass(frozen=True)
class Observation:
    """What one check of one integration found, before it is compared with the last record."""

    integration: str
    provider: str | None
    error: MailbrokerError | None = None
    token_expires_at: float | None = None
    last_refresh: float | None = None
    refreshed: bool = False
    smtp_checked: bool = False
    warnings: tuple[str, ...] = ()
    # The client_secret_expires_at value (or the certificate's notAfter), when it falls inside the
    # warning window.
    secret_expiring: str | None = None
    expiring_kind: str = "client secret"

    @property
    def healthy(self) -> bool:
        return self.error is None


@dataclass
class KeeperSummary:
    checked: list[str] = field(default_factory=list)
    healthy: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    unhealthy: list[str] = field(default_factory=list)
    alerts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "healthy": self.healthy,
            "refreshed": self.refreshed,
            "unhealthy": self.unhealthy,
            "alerts": self.alerts,
        }


@dataclass(frozen=True)
class Checked:
    record: HealthRecord
    observation: Observation
    alerts: tuple[Alert, ...]


SmtpCheck = Callable[["Integration"], Sequence["CheckStep"]]


class Keeper:
    def __init__(
        self,
        integrations: IntegrationCatalogue,
        broker: TokenKeeper,
        health: HealthStore,
        alerts: AlertSink,
        *,
        keep_alive_days: float = 7.0,
        secret_expiry_warning_days: float = 30.0,
        smtp_check: SmtpCheck | None = None,
        on_checked: Callable[[Checked], None] | None = None,
        clock: Callable[[], float] = time.time,
        max_workers: int = 4,
    ) -> None:
        self.integrations = integrations
        self.broker = broker
        self.health = health
        self.alerts = alerts
        self.keep_alive = keep_alive_days * DAY
        self.warning_window = secret_expiry_warning_days * DAY
        self.smtp_check = smtp_check
        self.on_checked = on_checked
        self._clock = clock
        self._max_workers = max_workers

    def run(self) -> KeeperSummary:
        """Check every integration; the summary names the ids in each outcome."""
        ids = self.integrations.list_ids()
        summary = KeeperSummary()
        if not ids:
            return summary
        with ThreadPoolExecutor(max_workers=max(1, min(self._max_workers, len(ids)))) as pool:
            results = list(pool.map(self._check_safely, ids))
        for integration_id, checked in zip(ids, results, strict=True):
            summary.checked.append(integration_id)
            healthy = checked is not None and checked.record.healthy
            (summary.healthy if healthy else summary.unhealthy).append(integration_id)
            if checked is not None:
                if checked.observation.refreshed:
                    summary.refreshed.append(integration_id)
                summary.alerts += len(checked.alerts)
        logger.info("keeper run finished", extra=summary.to_dict())
        return summary

    def _check_safely(self, integration_id: str) -> Checked | None:
        try:
            return self.check(integration_id)
        except MailbrokerError as exc:
            # The record could not be written (AWS trouble): the others still get their turn.
            logger.error("health record not written", extra={"integration": integration_id, "code": exc.code})
            return None
        except Exception:
            # A bug: logged with its traceback; the other integrations still get their turn.
            logger.exception("health record not written", extra={"integration": integration_id})
            return None

    def check(self, integration_id: str) -> Checked:
        """Observe one integration, record what was seen, and announce a transition."""
        observation = self.observe(integration_id)
        now = self._clock()
        for _ in range(_WRITE_ATTEMPTS):
            previous = self.health.get(integration_id)
            record = next_record(previous, observation, now)
            written = self.health.put(record, seen_version=previous.version if previous else None)
            if written is None:
                continue  # another keeper wrote first: compare against what it wrote
            alerts = tuple(alerts_for(previous, written, observation))
            sent = tuple(alert for alert in alerts if self._publish(alert))
            checked = Checked(written, observation, sent)
            if self.on_checked is not None:
                self.on_checked(checked)
            return checked
        raise MailbrokerError(
            f"health record of {integration_id!r} kept changing under the keeper", code="aws_unavailable"
        )

    def observe(self, integration_id: str) -> Observation:
        """Token (with keep-alive refresh), secret expiry and, if enabled, the live SMTP check."""
        try:
            integration = self.integrations.get(integration_id, force_fetch=True)
        except Exception as exc:
            return Observation(integration_id, None, error=self._classified(exc, integration_id))
        provider = integration.provider
        secret_expiring, warnings = secret_expiry(integration, self._clock(), self.warning_window)
        kind = "client certificate" if getattr(integration, "client_certificate", None) else "client secret"
        token_expires_at = last_refresh = None
        refreshed = False
        try:
            if not isinstance(integration, BasicIntegration):
                force = False
                if integration.uses_refresh_token:
                    stored = self.broker.stored(integration)
                    force = stored is not None and self._clock() - stored.issued_at >= self.keep_alive
                    last_refresh = stored.issued_at if stored else None
                token = self.broker.token_for_integration(integration, force_refresh=force)
                if integration.uses_refresh_token and hasattr(self.broker, "sync_refresh_token"):
                    self.broker.sync_refresh_token(integration)
                refreshed = token.source == "provider"
                token_expires_at = token.expires_at
                if refreshed:
                    last_refresh = self._clock()
                elif last_refresh is None:
                    stored = self.broker.stored(integration)
                    last_refresh = stored.issued_at if stored else None
            if integration.smtp_check and self.smtp_check is not None:
                failed = next((step for step in self.smtp_check(integration) if not step.ok), None)
                if failed is not None:
                    raise MailbrokerError(
                        f"SMTP check failed at {failed.name}: {failed.detail}",
                        code=failed.code or "smtp_transient",
                        hint=failed.hint or None,
                    )
        except Exception as exc:
            return Observation(
                integration_id,
                provider,
                error=self._classified(exc, integration_id),
                token_expires_at=token_expires_at,
                last_refresh=last_refresh,
                refreshed=refreshed,
                smtp_checked=bool(integration.smtp_check and self.smtp_check),
                warnings=warnings,
                secret_expiring=secret_expiring,
                expiring_kind=kind,
            )
        return Observation(
            integration_id,
            provider,
            token_expires_at=token_expires_at,
            last_refresh=last_refresh,
            refreshed=refreshed,
            smtp_checked=bool(integration.smtp_check and self.smtp_check),
            warnings=warnings,
            secret_expiring=secret_expiring,
            expiring_kind=kind,
        )

    def _classified(self, exc: Exception, integration_id: str) -> MailbrokerError:
        error = classify_exception(exc)
        if not isinstance(exc, MailbrokerError):
            logger.exception("integration check failed unexpectedly", extra={"integration": integration_id})
        else:
            logger.warning("integration unhealthy", extra={"integration": integration_id, "code": error.code})
        return error

    def _publish(self, alert: Alert) -> bool:
        try:
            sent = bool(self.alerts.publish(alert))
        except MailbrokerError as exc:
            logger.error(
                "alert not published",
                extra={"integration": alert.integration, "kind": alert.kind, "code": exc.code},
            )
            return False
        except Exception:
            logger.exception(
                "alert not published", extra={"integration": alert.integration, "kind": alert.kind}
            )
            return False
        if sent:
            logger.info("alert published", extra={"integration": alert.integration, "kind": alert.kind})
        return sent


def reconsent_command(provider: str | None, integration_id: str) -> str:
    """The command that gives an integration a new refresh token."""
    family = "microsoft" if provider == "microsoft_delegated" else "google"
    return f"mailbroker consent {family} {integration_id}"


def next_record(previous: HealthRecord | None, seen: Observation, now: float) -> HealthRecord:
    """The health record after ``seen``, carrying forward what it did not observe."""
    error = None
    if seen.error is not None:
        error = HealthError(seen.error.code, seen.error.message, seen.error.hint)
    return HealthRecord(
        integration=seen.integration,
        healthy=seen.healthy,
        checked_at=now,
        provider=seen.provider or (previous.provider if previous else None),
        last_success=now if seen.healthy else (previous.last_success if previous else None),
        last_refresh=seen.last_refresh or (previous.last_refresh if previous else None),
        token_expires_at=seen.token_expires_at,
        last_error=error,
        consecutive_failures=0 if seen.healthy else (previous.consecutive_failures if previous else 0) + 1,
        warnings=seen.warnings,
        smtp_checked=seen.smtp_checked,
        secret_expiry_warned=seen.secret_expiring,
    )


def alerts_for(previous: HealthRecord | None, record: HealthRecord, seen: Observation) -> list[Alert]:
    """The alerts a record change calls for: one per transition, none while nothing changes.

    A first record counts as a change from healthy, so an integration broken from the start is
    announced once."""
    alerts: list[Alert] = []
    was_healthy = previous.healthy if previous else True
    was_code = previous.last_error.code if previous and previous.last_error else None
    name = record.integration
    error = record.last_error
    if error is not None and error.code == "token_invalid_grant" and was_code != "token_invalid_grant":
        command = reconsent_command(record.provider, name)
        alerts.append(
            Alert(
                name,
                "reconsent",
                f"mailbroker: {name} needs re-consent",
                f"Integration {name} ({record.provider}) can no longer refresh its token: the refresh "
                f"token was rejected ({error.code}).\n\nRe-consent needed: {command}\n\n"
                f"{error.message}\nHint: {error.hint}",
                code=error.code,
                attributes={"command": command},
            )
        )
    elif error is not None and was_healthy:
        alerts.append(
            Alert(
                name,
                "unhealthy",
                f"mailbroker: {name} is unhealthy ({error.code})",
                f"Integration {name} ({record.provider}) became unhealthy at {iso(record.checked_at)}: "
                f"{error.code}.\n\n{error.message}\nHint: {error.hint}\n\n"
                f"Diagnose it step by step with: mailbroker doctor {name}",
                code=error.code,
            )
        )
    elif error is None and not was_healthy:
        alerts.append(
            Alert(
                name,
                "recovered",
                f"mailbroker: {name} is healthy again",
                f"Integration {name} ({record.provider}) is healthy again at {iso(record.checked_at)} "
                f"after {previous.consecutive_failures if previous else 0} failed check(s)"
                f" (last error: {was_code}).",
            )
        )
    if seen.secret_expiring and (previous is None or previous.secret_expiry_warned != seen.secret_expiring):
        if seen.expiring_kind == "client certificate":
            fix = (
                f"Make a new key and certificate with 'mailbroker cert create {name}', upload the new "
                "certificate to the app registration (Certificates & secrets > Certificates), then "
                "remove the old one."
            )
        else:
            fix = (
                "Create a new client secret for the app registration, then update the integration "
                "(client_secret and client_secret_expires_at) with "
                "'mailbroker integration add --from-file <file> --replace'."
            )
        alerts.append(
            Alert(
                name,
                "secret_expiring",
                f"mailbroker: {seen.expiring_kind} of {name} expires {seen.secret_expiring[:10]}",
                f"Integration {name}: {' '.join(seen.warnings)}\n\n{fix}",
                attributes={"expires_at": seen.secret_expiring},
            )
        )
    return alerts


def secret_expiry(integration: Integration, now: float, window: float) -> tuple[str | None, tuple[str, ...]]:
    """(the expiry when inside the warning window, warnings) for a Microsoft client secret
    (``client_secret_expires_at``) or client certificate (its own ``notAfter``)."""
    if not isinstance(integration, MicrosoftIntegration | MicrosoftDelegatedIntegration):
        return None, ()
    if integration.client_certificate is not None:
        from mailbroker.tokens.credentials import certificate_facts

        facts = certificate_facts(integration.client_certificate.certificate)
        return _expiry_warning(facts.not_after_iso, facts.not_after, now, window, "client certificate")
    value = integration.client_secret_expires_at
    if not value:
        return None, ()
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None, (f"client_secret_expires_at {value!r} is not an ISO 8601 date",)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return _expiry_warning(value, moment.timestamp(), now, window, "client secret")


def _expiry_warning(
    value: str, moment: float, now: float, window: float, what: str
) -> tuple[str | None, tuple[str, ...]]:
    left = moment - now
    if left > window:
        return None, ()
    day = dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%d")
    if left <= 0:
        return value, (f"The {what} expired on {day}.",)
    return value, (f"The {what} expires on {day} (in {max(int(left // DAY), 0)} days).",)


def live_check(
    integration: Integration, broker: TokenSource, *, ssl_context: ssl.SSLContext | None = None
) -> list[CheckStep]:
    """The live check behind ``POST /v1/integrations/{id}/check`` and the keeper's ``smtp_check``:
    a token through the broker, then connect, TLS, EHLO, AUTH and QUIT, or for an HTTP transport
    the token's claims and an empty request to its API. No mail is sent."""
    from mailbroker.smtp import BasicAuth, CheckStep, XOAuth2Auth, run_check

    if isinstance(integration, BasicIntegration):
        steps = [CheckStep("token", True, "basic authentication: no token needed")]
        auth: Authenticator = BasicAuth(integration.password)
    else:
        try:
            token = broker.token_for_integration(integration)
        except Exception as exc:
            error = classify_exception(exc)
            return [CheckStep("token", False, error.message, error.code, error.hint)]
        left = max(int(token.expires_at - time.time()), 0)
        steps = [CheckStep("token", True, f"access token from {token.source}, valid for {left} s")]
        if integration.transport != "smtp":
            from mailbroker.transports.check import api_check

            return steps + api_check(integration, token.access_token)

        def provide(fresh: bool) -> str:
            if not fresh:
                return token.access_token
            again = broker.token_for_integration(integration, rejected_token=token.access_token)
            return again.access_token

        auth = XOAuth2Auth(provide)
    steps.extend(run_check(integration.smtp, integration.username, auth, ssl_context))
    return steps


def live_smtp_check(integration: Integration, broker: TokenSource) -> list[CheckStep]:
    """The keeper's SMTP check (the token step is already part of every keeper run)."""
    return [step for step in live_check(integration, broker) if step.name != "token" or not step.ok]
