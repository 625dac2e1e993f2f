"""Health records and alerts: what the keeper last saw of each integration, and how it tells
operators about a change.

One item per integration in the token table (``pk = health#<id>``). The record is written with a
conditional put on the ``version`` the writer read, so two keepers running at once cannot both
record the same transition: the loser re-reads and finds nothing new to announce. Alerts go out
only after the record that announces them is written, which makes them one per transition.

Records and alerts carry codes, hints and times, never a credential.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mailbroker.dynamodb import AWS_ERRORS, Table, epoch, iso
from mailbroker.errors import aws_failure

__all__ = ["Alert", "HealthError", "HealthRecord", "HealthStore", "SnsAlerts", "epoch", "iso"]

# A record outlives its integration by this long (the table's TTL then removes it).
RECORD_TTL_SECONDS = 30 * 86400


@dataclass(frozen=True)
class HealthError:
    code: str
    message: str
    hint: str


@dataclass(frozen=True)
class HealthRecord:
    """The keeper's last word on one integration."""

    integration: str
    healthy: bool
    checked_at: float
    provider: str | None = None
    last_success: float | None = None
    # When the provider last issued a token for this credential (for refresh-token credentials:
    # when the refresh token was last exercised).
    last_refresh: float | None = None
    token_expires_at: float | None = None
    last_error: HealthError | None = None
    consecutive_failures: int = 0
    warnings: tuple[str, ...] = ()
    smtp_checked: bool = False
    # The client_secret_expires_at value operators were already warned about.
    secret_expiry_warned: str | None = None
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The record as the HTTP API and the CLI show it."""
        return {
            "integration": self.integration,
            "provider": self.provider,
            "healthy": self.healthy,
            "checked_at": iso(self.checked_at),
            "last_success": iso(self.last_success),
            "last_refresh": iso(self.last_refresh),
            "token_expires_at": iso(self.token_expires_at),
            "last_error": asdict(self.last_error) if self.last_error else None,
            "consecutive_failures": self.consecutive_failures,
            "warnings": list(self.warnings),
            "smtp_checked": self.smtp_checked,
        }

    def _document(self) -> str:
        doc = self.to_dict()
        doc["secret_expiry_warned"] = self.secret_expiry_warned
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def _from_document(cls, text: str, version: int) -> HealthRecord:
        doc = json.loads(text)
        error = doc.get("last_error")
        return cls(
            integration=doc["integration"],
            healthy=bool(doc["healthy"]),
            checked_at=epoch(doc["checked_at"]) or 0.0,
            provider=doc.get("provider"),
            last_success=epoch(doc.get("last_success")),
            last_refresh=epoch(doc.get("last_refresh")),
            token_expires_at=epoch(doc.get("token_expires_at")),
            last_error=HealthError(**error) if error else None,
            consecutive_failures=int(doc.get("consecutive_failures", 0)),
            warnings=tuple(doc.get("warnings", ())),
            smtp_checked=bool(doc.get("smtp_checked", False)),
            secret_expiry_warned=doc.get("secret_expiry_warned"),
            version=version,
        )

    def with_version(self, version: int) -> HealthRecord:
        return replace(self, version=version)


class HealthStore:
    """Health records in the token table, written with optimistic concurrency."""

    def __init__(self, dynamodb_client: Any, table: str) -> None:
        self._table = Table(dynamodb_client, table, purpose="for a health record")

    @staticmethod
    def key(integration_id: str) -> str:
        return f"health#{integration_id}"

    def get(self, integration_id: str) -> HealthRecord | None:
        item = self._table.get(self.key(integration_id))
        if not item:
            return None
        return HealthRecord._from_document(item["doc"]["S"], int(item["version"]["N"]))

    def put(self, record: HealthRecord, *, seen_version: int | None) -> HealthRecord | None:
        """Write ``record`` if the stored one is still at ``seen_version`` (None: there was none).
        Returns the record as written, or None when another writer came first."""
        version = (seen_version or 0) + 1
        condition = "attribute_not_exists(pk)" if seen_version is None else "version = :seen"
        values = {":seen": {"N": str(seen_version)}} if seen_version is not None else None
        item = {
            "pk": {"S": self.key(record.integration)},
            "version": {"N": str(version)},
            "healthy": {"BOOL": record.healthy},
            "checked_at": {"N": repr(record.checked_at)},
            "doc": {"S": record._document()},
            "ttl": {"N": str(int(record.checked_at) + RECORD_TTL_SECONDS)},
        }
        if not self._table.put(item, condition=condition, values=values):
            return None
        return record.with_version(version)


@dataclass(frozen=True)
class Alert:
    """One notification for operators. ``kind``: unhealthy, recovered, reconsent, secret_expiring."""

    integration: str
    kind: str
    subject: str
    message: str
    code: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


class SnsAlerts:
    """Publishes alerts to the stack's SNS topic (nothing is published without a topic)."""

    def __init__(self, sns_client: Any, topic_arn: str) -> None:
        self._sns = sns_client
        self.topic_arn = topic_arn

    def publish(self, alert: Alert) -> bool:
        if not self.topic_arn:
            return False
        attributes = {
            "integration": alert.integration,
            "kind": alert.kind,
            **({"code": alert.code} if alert.code else {}),
            **alert.attributes,
        }
        try:
            self._sns.publish(
                TopicArn=self.topic_arn,
                Subject=alert.subject[:100],
                Message=alert.message,
                MessageAttributes={
                    name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
                },
            )
        except AWS_ERRORS as exc:
            raise aws_failure(exc, "SNS Publish") from exc
        return True
