"""Message status records, and the idempotency guard that keeps one id from being sent twice.

One DynamoDB item per message id (``pk = msg#<id>``) in ``MESSAGE_TABLE``:

- ``status``: ``queued`` → ``sending`` → ``sent``, or ``retrying`` / ``failed``;
- ``integration``, ``attempts``, ``next_attempt_at``, ``last_error`` ``{code, message, hint, ...}``,
  ``reply`` (the server's final reply) and ``refused`` (recipients the server refused for good,
  with its replies), ``created_at`` / ``updated_at``;
- ``recipients``: each recipient's own outcome once the server answered for it — ``delivered``
  (with the reply that took the message), ``retrying`` (a temporary refusal: it alone is tried
  again, on the retry schedule) or ``failed`` (with the code and hint). A message is ``sent`` only
  when no recipient is left ``retrying``; a delivered recipient is never sent the message again,
  not even after a re-drive inside the idempotency window;
- ``ttl``: the end of the idempotency window. DynamoDB deletes expired items days late, so every
  reader checks ``ttl`` itself: a record past it counts as absent;
- ``version``, ``lease_owner``, ``lease_until``, ``cycle_started_at``: internal. Every write is
  conditional on the version the writer read, so two environments holding two copies of one
  message cannot both move it to ``sending``; the lease tells a live sender from a dead one.

The record is the idempotency key: a message is sent only by the environment whose conditional
write moved its record to ``sending``, and never when the record says ``sent`` within the window.
Nothing that can authenticate is ever written here: errors carry codes and descriptions only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from mailbroker.dynamodb import Table, iso, num, number, text
from mailbroker.errors import MailbrokerError, scrub
from mailbroker.messages.engagement import engagement_of

KEY_PREFIX = "msg#"
STATUSES = ("queued", "sending", "sent", "retrying", "failed")
# Statuses in which the message is on its way: a second post answers the record, never re-queues.
IN_FLIGHT = frozenset({"queued", "sending", "sent", "retrying"})


class StatusConflict(Exception):
    """The record changed between the read and the conditional write: read it again."""


class ClaimRefused(Exception):
    """:meth:`MessageStatusStore.claim` found the id neither new nor waiting; ``current`` is the
    record as stored, answered by the refused write itself."""

    def __init__(self, current: MessageRecord | None) -> None:
        super().__init__("the id is not waiting to be sent")
        self.current = current


# A claim without a read first succeeds on a record in one of these statuses (inside its window)
# or on no record at all; any other record is decided on by the caller from the answered record.
_CLAIMABLE = ("queued", "retrying")


@dataclass(frozen=True)
class MessageRecord:
    id: str
    status: str
    integration: str | None = None
    attempts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    next_attempt_at: float | None = None
    last_error: dict[str, Any] | None = None
    reply: str | None = None
    refused: tuple[dict[str, str], ...] = field(default_factory=tuple)
    recipients: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    ttl: int = 0
    version: int = 0
    lease_owner: str | None = None
    lease_until: float = 0.0
    cycle_started_at: float = 0.0
    # Opens and clicks of a tracked message (``messages/engagement.py``), as the API shows them.
    engagement: dict[str, Any] = field(default_factory=dict)

    def is_live(self, now: float) -> bool:
        """Inside the idempotency window (DynamoDB may not have deleted an expired item yet)."""
        return self.ttl > now

    def lease_held(self, now: float) -> bool:
        return self.status == "sending" and self.lease_until > now

    def recipients_in(self, *states: str) -> set[str]:
        """The recipients (casefolded) whose outcome is one of ``states``."""
        return {str(r["recipient"]).casefold() for r in self.recipients if r.get("status") in states}

    def to_public(self) -> dict[str, Any]:
        """The record as ``GET /v1/messages/{id}`` answers it."""
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "integration": self.integration,
            "attempts": self.attempts,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }
        if self.status == "retrying" and self.next_attempt_at is not None:
            body["next_attempt_at"] = iso(self.next_attempt_at)
        if self.last_error is not None:
            body["last_error"] = self.last_error
        if self.reply is not None:
            body["reply"] = self.reply
        if self.refused:
            body["refused"] = list(self.refused)
        if self.recipients:
            body["recipients"] = list(self.recipients)
        body.update(self.engagement)
        return body


def error_record(error: MailbrokerError) -> dict[str, Any]:
    """What a status record and the dead-letter queue keep of an error."""
    record: dict[str, Any] = {"code": error.code, "message": error.message, "hint": error.hint}
    if error.details:
        record["details"] = error.details
    reply = getattr(error, "reply", None)
    if reply is not None:
        record["reply"] = scrub(str(reply))
    stage = getattr(error, "stage", "")
    if stage:
        record["stage"] = stage
    return record


def is_new_cycle(seen: MessageRecord | None, now: float) -> bool:
    """True when a write starts a fresh delivery of the id: no live record, or it had failed (a
    re-drive or a new post after a failure)."""
    return seen is None or not seen.is_live(now) or seen.status == "failed"


def attempts_so_far(seen: MessageRecord | None, now: float) -> int:
    return 0 if is_new_cycle(seen, now) else seen.attempts  # type: ignore[union-attr]


class MessageStatusStore:
    """Reads and writes status records. ``window_seconds`` is the idempotency window."""

    def __init__(
        self,
        dynamodb_client: Any,
        table: str,
        *,
        window_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._table = Table(dynamodb_client, table, purpose="for a message status")
        self.window_seconds = window_seconds
        self._clock = clock

    # ------------------------------------------------------------------ reads

    def load(self, message_id: str) -> MessageRecord | None:
        """The stored record, even one past its window (``is_live`` says which)."""
        item = self._table.get(KEY_PREFIX + message_id)
        return _from_item(item) if item else None

    def get(self, message_id: str) -> MessageRecord | None:
        """The record inside its window, or None."""
        record = self.load(message_id)
        return record if record and record.is_live(self._clock()) else None

    # ------------------------------------------------------------------ transitions

    def queue(self, message_id: str, integration: str, seen: MessageRecord | None) -> MessageRecord:
        return self._write(
            self._next(message_id, seen, status="queued", integration=integration, attempts=0),
            seen,
        )

    def start_sending(
        self,
        message_id: str,
        integration: str,
        seen: MessageRecord | None,
        *,
        holder: str,
        lease_seconds: float,
    ) -> MessageRecord:
        """Claim the id for one send; raises :class:`StatusConflict` if anyone wrote since ``seen``."""
        now = self._clock()
        record = self._next(
            message_id,
            seen,
            status="sending",
            integration=integration,
            attempts=attempts_so_far(seen, now),
            lease_owner=holder,
            lease_until=now + lease_seconds,
        )
        return self._write(record, seen)

    def claim(
        self, message_id: str, integration: str, *, holder: str, lease_seconds: float
    ) -> tuple[MessageRecord | None, MessageRecord]:
        """Claim the id for one send in a single conditional write, without reading it first.

        The write holds when there is no record or the record is ``queued`` or ``retrying``
        inside its window (the common case: a message the API queued, or one waiting for its
        retry); it then writes exactly what :meth:`start_sending` would from the record it found,
        and answers ``(record before, claimed record)``. Otherwise nothing is written and
        :class:`ClaimRefused` carries the stored record (duplicate, another sender's claim, a
        failure being re-driven, a record past its window) for the caller to decide on."""
        now = self._clock()
        lease_until = now + lease_seconds
        ttl = int(now + self.window_seconds)
        written, item = self._table.update_or_current(
            KEY_PREFIX + message_id,
            "SET #status = :sending, #id = :id, integration = :integration, lease_owner = :holder, "
            "lease_until = :lease_until, updated_at = :now, #ttl = :ttl, "
            "created_at = if_not_exists(created_at, :now), "
            "cycle_started_at = if_not_exists(cycle_started_at, :now), "
            "attempts = if_not_exists(attempts, :zero), "
            "version = if_not_exists(version, :zero) + :one "
            "REMOVE next_attempt_at",
            condition="attribute_not_exists(pk) OR (#status IN (:queued, :retrying) AND #ttl > :now)",
            names={"#status": "status", "#ttl": "ttl", "#id": "id"},
            values={
                ":sending": {"S": "sending"},
                ":id": {"S": message_id},
                ":integration": {"S": integration},
                ":holder": {"S": holder},
                ":lease_until": {"N": num(lease_until)},
                ":now": {"N": num(now)},
                ":ttl": {"N": str(ttl)},
                ":zero": {"N": "0"},
                ":one": {"N": "1"},
                ":queued": {"S": _CLAIMABLE[0]},
                ":retrying": {"S": _CLAIMABLE[1]},
            },
        )
        before = _from_item(item) if item else None
        if not written:
            raise ClaimRefused(before)
        claimed = self._next(
            message_id,
            before,
            status="sending",
            integration=integration,
            attempts=attempts_so_far(before, now),
            lease_owner=holder,
            lease_until=lease_until,
        )
        claimed = replace(claimed, updated_at=now, ttl=ttl)
        if before is None:
            claimed = replace(claimed, created_at=now, cycle_started_at=now)
        return before, claimed

    def sent(
        self, message_id: str, integration: str, seen: MessageRecord | None, **outcome: Any
    ) -> MessageRecord:
        """The server took the message: :meth:`sent_record`'s record (``outcome``: its reply,
        refused and recipients), written whatever happened to the record meanwhile."""
        record = self.sent_record(message_id, integration, seen, **outcome)
        return self._write(record, None, unconditional=True)

    def sent_record(
        self,
        message_id: str,
        integration: str,
        seen: MessageRecord | None,
        *,
        reply: str,
        refused: list[dict[str, str]],
        recipients: list[dict[str, Any]] | None = None,
    ) -> MessageRecord:
        """The record :meth:`sent` writes, as of now, without writing it (:meth:`record_all`
        writes several in one request)."""
        changes: dict[str, Any] = {"recipients": tuple(recipients)} if recipients is not None else {}
        return self._next(
            message_id,
            seen,
            status="sent",
            integration=integration,
            attempts=attempts_so_far(seen, self._clock()) + 1,
            reply=reply,
            refused=tuple(refused),
            last_error=None,
            **changes,
        )

    def record_all(self, records: list[MessageRecord]) -> list[MessageRecord]:
        """Write records whole, whatever happened to them meanwhile, as :meth:`sent` does: 25 to
        a request. Answers the records that could not be written (raises ``aws_unavailable`` when
        DynamoDB refused the requests themselves)."""
        if not records:
            return []
        by_key = {KEY_PREFIX + record.id: record for record in records}
        left = self._table.put_all([_to_item(record) for record in by_key.values()])
        return [by_key[item["pk"]["S"]] for item in left]

    def partly_sent(
        self,
        message_id: str,
        integration: str,
        seen: MessageRecord | None,
        *,
        reply: str,
        recipients: list[dict[str, Any]],
    ) -> MessageRecord:
        """The server took the message for some recipients and refused others for now: the
        outcome of each is kept (whatever happened to the record meanwhile, as for ``sent``), the
        status stays ``sending`` until the retry is recorded."""
        record = self._next(
            message_id,
            seen,
            status="sending",
            integration=integration,
            attempts=attempts_so_far(seen, self._clock()),
            reply=reply,
            recipients=tuple(recipients),
            lease_owner=seen.lease_owner if seen else None,
            lease_until=seen.lease_until if seen else 0.0,
        )
        return self._write(record, None, unconditional=True)

    def retrying(
        self,
        message_id: str,
        integration: str | None,
        seen: MessageRecord | None,
        *,
        error: dict[str, Any],
        attempts: int,
        next_attempt_at: float,
    ) -> MessageRecord:
        record = self._next(
            message_id,
            seen,
            status="retrying",
            integration=integration,
            attempts=attempts,
            next_attempt_at=next_attempt_at,
            last_error=error,
        )
        return self._write(record, seen)

    def failed(
        self,
        message_id: str,
        integration: str | None,
        seen: MessageRecord | None,
        *,
        error: dict[str, Any],
        attempts: int,
    ) -> MessageRecord:
        settled = tuple(
            {**r, "status": "failed", "code": error.get("code"), "hint": error.get("hint")}
            if r.get("status") == "retrying"
            else r
            for r in (seen.recipients if seen else ())
        )
        record = self._next(
            message_id,
            seen,
            status="failed",
            integration=integration,
            attempts=attempts,
            last_error=error,
            recipients=settled,
        )
        return self._write(record, seen)

    # ------------------------------------------------------------------ internals

    def _next(self, message_id: str, seen: MessageRecord | None, **changes: Any) -> MessageRecord:
        now = self._clock()
        new_cycle = is_new_cycle(seen, now)
        base = MessageRecord(id=message_id, status="queued", created_at=now) if new_cycle else seen
        assert base is not None
        if new_cycle and seen is not None and seen.is_live(now):
            # A re-drive inside the window: who already has the message keeps it, once.
            delivered = tuple(r for r in seen.recipients if r.get("status") == "delivered")
            base = replace(base, recipients=delivered)
        if changes.get("integration") is None:
            changes["integration"] = seen.integration if seen else None
        fields: dict[str, Any] = {
            "id": message_id,
            "next_attempt_at": None,
            "lease_owner": None,
            "lease_until": 0.0,
            "created_at": base.created_at or now,
            "updated_at": now,
            "ttl": int(now + self.window_seconds),
            "version": (seen.version if seen else 0) + 1,
            "cycle_started_at": now if new_cycle else base.cycle_started_at,
        }
        return replace(base, **{**fields, **changes})

    def _write(
        self, record: MessageRecord, seen: MessageRecord | None, *, unconditional: bool = False
    ) -> MessageRecord:
        condition: str | None = None
        values: dict[str, Any] | None = None
        if not unconditional:
            if seen is None:
                condition = "attribute_not_exists(pk)"
            else:
                condition = "version = :seen"
                values = {":seen": {"N": str(seen.version)}}
        if not self._table.put(_to_item(record), condition=condition, values=values):
            raise StatusConflict(record.id)
        return record


def _to_item(record: MessageRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pk": {"S": KEY_PREFIX + record.id},
        "id": {"S": record.id},
        "status": {"S": record.status},
        "attempts": {"N": str(record.attempts)},
        "created_at": {"N": num(record.created_at)},
        "updated_at": {"N": num(record.updated_at)},
        "ttl": {"N": str(record.ttl)},
        "version": {"N": str(record.version)},
        "cycle_started_at": {"N": num(record.cycle_started_at)},
    }
    if record.integration:
        item["integration"] = {"S": record.integration}
    if record.next_attempt_at is not None:
        item["next_attempt_at"] = {"N": num(record.next_attempt_at)}
    if record.last_error is not None:
        item["last_error"] = {"S": json.dumps(record.last_error, ensure_ascii=False)}
    if record.reply is not None:
        item["reply"] = {"S": record.reply}
    if record.refused:
        item["refused"] = {"S": json.dumps(list(record.refused), ensure_ascii=False)}
    if record.recipients:
        item["recipients"] = {"S": json.dumps(list(record.recipients), ensure_ascii=False)}
    if record.lease_owner:
        item["lease_owner"] = {"S": record.lease_owner}
        item["lease_until"] = {"N": num(record.lease_until)}
    return item


def _from_item(item: dict[str, Any]) -> MessageRecord:
    last_error = text(item, "last_error")
    refused = text(item, "refused")
    recipients = text(item, "recipients")
    return MessageRecord(
        id=item["id"]["S"],
        status=item["status"]["S"],
        integration=text(item, "integration"),
        attempts=int(number(item, "attempts")),
        created_at=number(item, "created_at"),
        updated_at=number(item, "updated_at"),
        next_attempt_at=number(item, "next_attempt_at") if "next_attempt_at" in item else None,
        last_error=json.loads(last_error) if last_error else None,
        reply=text(item, "reply"),
        refused=tuple(json.loads(refused)) if refused else (),
        recipients=tuple(json.loads(recipients)) if recipients else (),
        ttl=int(number(item, "ttl")),
        version=int(number(item, "version")),
        lease_owner=text(item, "lease_owner"),
        lease_until=number(item, "lease_until"),
        cycle_started_at=number(item, "cycle_started_at"),
        engagement=engagement_of(item),
    )
