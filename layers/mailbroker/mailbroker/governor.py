"""The per-mailbox send governor: the same limits across every sender environment.

Microsoft 365 allows 3 concurrent SMTP connections and 30 messages a minute per mailbox; Gmail
and Workspace have daily caps. Each integration's ``limits`` (``integration.effective_limits()``)
are enforced with three small DynamoDB items, each written only by a conditional update:

- ``gov#<id>#conn`` — the connection semaphore: a map of slot → lease expiry. A slot is taken by
  rewriting the map of live leases plus the new one, on condition that ``version`` is still the
  one read; a holder that dies leaves a lease that simply expires.
- ``gov#<id>#rate`` — a token bucket for messages per minute: ``tokens`` and ``refilled_at``,
  taken the same way (read, compute the refill, write on the version read). The bucket holds
  ``burst = max(1, n // 10)`` tokens and refills at ``(n - burst + 1) / 60`` per second, so no
  60-second window ever holds more than ``n`` messages, bursts included.
- ``gov#<id>#day#<YYYY-MM-DD>`` — recipients sent on that UTC day, counted with a conditional
  ``ADD`` that refuses to pass the cap (a single message larger than the whole cap goes through on
  an otherwise empty day, so it is never held back forever).

A throttling reply (432, 421, 451 4.7.x, 454, 450 4.2.1) calls :meth:`SendGovernor.slow_down`,
which opens a slow-down window on both items: the bucket is emptied, refills at half the rate
with a burst of one, and new connections are capped at half of ``max_connections`` (one when the
integration sets no connection limit). Capacity already in use is not revoked.

Over a limit is not a failure: :class:`GovernorDelay` carries ``retry_after``, the seconds until
capacity returns, and the sender puts the message back on the queue for that long without
counting an attempt.
"""

from __future__ import annotations

import contextlib
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mailbroker.dynamodb import Table, integer, num, number
from mailbroker.errors import AwsUnavailable

if TYPE_CHECKING:
    from mailbroker.integrations import Limits

_ATTEMPTS = 30  # conditional-write rounds before a contended caller is told to come back shortly
_CONTENDED_RETRY = 1.0
_MIN_RETRY = 0.05
_TTL_GRACE = 86400
# How long a sender refused a connection slot asks the holders of idle sessions to give theirs up.
_WANTED_SECONDS = 60.0


class GovernorDelay(Exception):
    """Not a failure: put the message back with this delay; its attempt count stays unchanged."""

    def __init__(self, retry_after: float, reason: str) -> None:
        self.retry_after = max(_MIN_RETRY, retry_after)
        self.reason = reason  # connections | rate | recipients_per_day | contention
        super().__init__(f"send governor: {reason} limit reached; retry in {self.retry_after:.2f} s")


@dataclass(frozen=True)
class ConnectionSlot:
    """One connection a sender may hold open for an integration until ``expires_at``."""

    integration_id: str
    slot_id: str
    expires_at: float
    leased: bool = True  # False when the integration sets no connection limit (nothing to release)


@dataclass(frozen=True)
class RateGrant:
    """Places in an integration's pace taken at once by :meth:`SendGovernor.take_messages`;
    ``version`` is the bucket's version the taking write left (None: no rate limit)."""

    integration_id: str
    granted: int
    version: int | None


@dataclass(frozen=True)
class Pace:
    """Messages per second refilled into a bucket holding at most ``burst`` tokens."""

    rate: float
    burst: float

    @classmethod
    def of(cls, messages_per_minute: int, *, slowed: bool) -> Pace:
        if slowed:
            return cls(rate=messages_per_minute / 120.0, burst=1.0)
        burst = max(1, messages_per_minute // 10)
        return cls(rate=(messages_per_minute - burst + 1) / 60.0, burst=float(burst))


class SendGovernor:
    def __init__(
        self,
        dynamodb_client: Any,
        table: str,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        busy_retry_seconds: float = 5.0,
    ) -> None:
        """``busy_retry_seconds`` caps the delay given when every connection is taken: a live
        holder usually releases long before its lease expires."""
        self._table = Table(dynamodb_client, table, purpose="for the send governor")
        self._clock = clock
        self._sleep = sleep
        self._busy_retry = busy_retry_seconds

    # ------------------------------------------------------------------ connections

    def open_connection(
        self, integration_id: str, limits: Limits, *, holder: str, lease_seconds: float
    ) -> ConnectionSlot:
        """Take one of the integration's connection slots for ``lease_seconds``, or raise
        :class:`GovernorDelay`. Release it with :meth:`release_connection`."""
        key = _conn_key(integration_id)
        slot_id = f"{holder}#{secrets.token_hex(4)}"
        for attempt in range(_ATTEMPTS):
            now = self._clock()
            item = self._get(key)
            version = integer(item, "version")
            slowed = number(item, "slow_until") > now
            cap = _connection_cap(limits.max_connections, slowed=slowed)
            if cap is None:
                return ConnectionSlot(integration_id, slot_id, now + lease_seconds, leased=False)
            live = {
                slot: float(value["N"])
                for slot, value in item.get("holders", {}).get("M", {}).items()
                if float(value["N"]) > now
            }
            if len(live) >= cap:
                earliest = sorted(live.values())[len(live) - cap]
                self._want_slot(key, now)
                raise GovernorDelay(min(earliest - now, self._busy_retry), "connections")
            expires_at = now + lease_seconds
            live[slot_id] = expires_at
            if self._put_versioned(
                key,
                version,
                "SET holders = :holders, wanted_until = :zero",  # the waiting sender is served
                {":holders": {"M": {slot: {"N": _time(exp)} for slot, exp in live.items()}}},
                ttl=max(live.values()) + _TTL_GRACE,
            ):
                return ConnectionSlot(integration_id, slot_id, expires_at)
            self._back_off(attempt)
        raise GovernorDelay(_CONTENDED_RETRY, "contention")

    def renew_connection(
        self, slot: ConnectionSlot, *, lease_seconds: float, unless_wanted: bool = False
    ) -> ConnectionSlot | None:
        """Move a live slot's lease to ``lease_seconds`` from now (longer or shorter), or None when
        the slot is no longer held (its lease lapsed or it was released): take a new one then.
        ``unless_wanted``: None too when another sender was refused a slot in the last minute
        (an idle session gives its slot up then; the caller releases it)."""
        now = self._clock()
        expires_at = now + lease_seconds
        if not slot.leased:
            return ConnectionSlot(slot.integration_id, slot.slot_id, expires_at, leased=False)
        condition = "holders.#slot > :now"
        if unless_wanted:
            condition += " AND (attribute_not_exists(wanted_until) OR wanted_until < :now)"
        # The version moves too, so a writer that read the map before this cannot write back the
        # old expiry.
        renewed = self._table.update(
            _conn_key(slot.integration_id),
            "SET holders.#slot = :expires, #ttl = :ttl, version = if_not_exists(version, :zero) + :one",
            condition=condition,
            names={"#slot": slot.slot_id, "#ttl": "ttl"},
            values={
                ":expires": {"N": _time(expires_at)},
                ":now": {"N": _time(now)},
                ":ttl": {"N": str(int(expires_at + _TTL_GRACE))},
                ":zero": {"N": "0"},
                ":one": {"N": "1"},
            },
        )
        return ConnectionSlot(slot.integration_id, slot.slot_id, expires_at) if renewed else None

    def release_connection(self, slot: ConnectionSlot) -> None:
        """Give the slot back. Releasing twice, or after the lease lapsed, does nothing."""
        if slot.leased:
            self._update_slot(slot, "REMOVE holders.#slot", {})

    # ------------------------------------------------------------------ messages

    def take_message(self, integration_id: str, limits: Limits, recipients: int = 1) -> None:
        """Count one message to ``recipients`` recipients against the integration's rate and
        daily cap, or raise :class:`GovernorDelay` without counting anything."""
        per_day = limits.recipients_per_day
        counted_day: str | None = None
        try:
            for attempt in range(_ATTEMPTS):
                now = self._clock()
                key = _rate_key(integration_id)
                item = self._get(key) if limits.messages_per_minute else {}
                tokens = 0.0
                if limits.messages_per_minute:
                    pace = Pace.of(limits.messages_per_minute, slowed=number(item, "slow_until") > now)
                    tokens = _refilled(item, pace, now)
                    if tokens < 1.0:
                        raise GovernorDelay((1.0 - tokens) / pace.rate, "rate")
                if per_day and counted_day is None:
                    counted_day = self._count_recipients(integration_id, per_day, recipients, now)
                if not limits.messages_per_minute:
                    counted_day = None
                    return
                if self._put_versioned(
                    key,
                    integer(item, "version"),
                    "SET tokens = :tokens, refilled_at = :now",
                    {":tokens": {"N": _tokens(tokens - 1.0)}, ":now": {"N": _time(now)}},
                    ttl=now + _TTL_GRACE,
                ):
                    counted_day = None  # the message is through: keep the count
                    return
                self._back_off(attempt)
            raise GovernorDelay(_CONTENDED_RETRY, "contention")
        finally:
            if counted_day is not None:
                self._uncount_recipients(integration_id, counted_day, recipients)

    def take_messages(self, integration_id: str, limits: Any, wanted: int) -> RateGrant:
        """Take up to ``wanted`` messages' places in the integration's pace in one conditional
        write: as many as the bucket holds now (at least one, or :class:`GovernorDelay`). Places
        a batch does not use go back with :meth:`give_back`. The daily recipient cap is counted
        per message, with :meth:`count_recipients`."""
        wanted = max(1, wanted)
        if not limits.messages_per_minute:
            return RateGrant(integration_id, wanted, None)
        key = _rate_key(integration_id)
        for attempt in range(_ATTEMPTS):
            now = self._clock()
            item = self._get(key)
            pace = Pace.of(limits.messages_per_minute, slowed=number(item, "slow_until") > now)
            tokens = _refilled(item, pace, now)
            if tokens < 1.0:
                raise GovernorDelay((1.0 - tokens) / pace.rate, "rate")
            granted = min(wanted, math.floor(tokens + 1e-9))
            version = integer(item, "version")
            if self._put_versioned(
                key,
                version,
                "SET tokens = :tokens, refilled_at = :now",
                {":tokens": {"N": _tokens(tokens - granted)}, ":now": {"N": _time(now)}},
                ttl=now + _TTL_GRACE,
            ):
                return RateGrant(integration_id, granted, (version or 0) + 1)
            self._back_off(attempt)
        raise GovernorDelay(_CONTENDED_RETRY, "contention")

    def give_back(self, grant: RateGrant, unused: int) -> None:
        """Return places a batch took and did not use, only if nobody wrote the bucket since:
        then the bucket is exactly as if they had never been taken. Otherwise they stay taken,
        which only slows the pace down for a moment (never past the limit)."""
        if unused <= 0 or grant.version is None:
            return
        with contextlib.suppress(AwsUnavailable):
            self._table.update(
                _rate_key(grant.integration_id),
                "SET tokens = tokens + :n",
                condition="version = :ours",
                values={":n": {"N": str(unused)}, ":ours": {"N": str(grant.version)}},
            )

    def count_recipients(self, integration_id: str, limits: Any, recipients: int) -> None:
        """Count one message's recipients against the daily cap, or raise :class:`GovernorDelay`
        (nothing counted). Nothing to do when the integration has no daily cap."""
        if limits.recipients_per_day:
            self._count_recipients(integration_id, limits.recipients_per_day, recipients, self._clock())

    def slow_down(self, integration_id: str, *, seconds: float) -> None:
        """After a throttling reply: for ``seconds``, half the pace and half the connections."""
        now = self._clock()
        until = now + seconds
        self._open_window(_rate_key(integration_id), until, "tokens = :zero, refilled_at = :now", now)
        self._open_window(_conn_key(integration_id), until, "", now)

    # ------------------------------------------------------------------ DynamoDB

    def _count_recipients(self, integration_id: str, per_day: int, recipients: int, now: float) -> str:
        day = datetime.fromtimestamp(now, UTC).date()
        next_midnight = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC).timestamp()
        # A message larger than a whole day's cap goes through on an otherwise empty day.
        room = max(0, per_day - recipients)
        counted = self._table.update(
            _day_key(integration_id, day.isoformat()),
            "ADD recipients :n SET #ttl = :ttl",
            condition="attribute_not_exists(recipients) OR recipients <= :room",
            names={"#ttl": "ttl"},
            values={
                ":n": {"N": str(recipients)},
                ":room": {"N": str(room)},
                ":ttl": {"N": str(int(next_midnight) + 2 * _TTL_GRACE)},
            },
        )
        if not counted:
            raise GovernorDelay(next_midnight - now, "recipients_per_day")
        return day.isoformat()

    def _uncount_recipients(self, integration_id: str, day: str, recipients: int) -> None:
        # Best effort: a count that cannot be given back only makes the day's cap stricter.
        with contextlib.suppress(AwsUnavailable):
            self._table.update(
                _day_key(integration_id, day),
                "ADD recipients :n",
                condition="attribute_exists(recipients)",
                values={":n": {"N": str(-recipients)}},
            )

    def _get(self, key: str) -> dict[str, Any]:
        return self._table.get(key) or {}

    def _put_versioned(
        self, key: str, version: int | None, update: str, values: dict[str, Any], *, ttl: float
    ) -> bool:
        """Apply ``update`` if the item's version is still ``version`` (None: no item yet) and
        bump it. False when another environment wrote first."""
        values = {**values, ":one": {"N": "1"}, ":zero": {"N": "0"}, ":ttl": {"N": str(int(ttl))}}
        if version is None:
            condition = "attribute_not_exists(version)"
        else:
            condition = "version = :seen"
            values[":seen"] = {"N": str(version)}
        return self._table.update(
            key,
            f"{update}, #ttl = :ttl, version = if_not_exists(version, :zero) + :one",
            condition=condition,
            names={"#ttl": "ttl"},
            values=values,
        )

    def _update_slot(self, slot: ConnectionSlot, update: str, values: dict[str, Any]) -> bool:
        set_version = "version = if_not_exists(version, :zero) + :one"
        if update.startswith("SET "):
            expression = f"{update}, {set_version}"
        else:
            expression = f"{update} SET {set_version}"
        return self._table.update(
            _conn_key(slot.integration_id),
            expression,
            condition="attribute_exists(holders.#slot)",
            names={"#slot": slot.slot_id},
            values={**values, ":one": {"N": "1"}, ":zero": {"N": "0"}},
        )

    def _want_slot(self, key: str, now: float) -> None:
        """Tell the holders of idle sessions that a sender is waiting for a slot. Best effort: a
        sender that cannot say so still waits for a lease to end."""
        with contextlib.suppress(AwsUnavailable):
            self._table.update(
                key, "SET wanted_until = :until", values={":until": {"N": _time(now + _WANTED_SECONDS)}}
            )

    def _open_window(self, key: str, until: float, extra: str, now: float) -> None:
        """Set ``slow_until`` unless a longer window is already open; bump the version so that a
        write computed before the window cannot land after it."""
        update = "SET slow_until = :until, #ttl = :ttl, version = if_not_exists(version, :zero) + :one"
        values = {
            ":until": {"N": _time(until)},
            ":ttl": {"N": str(int(until) + _TTL_GRACE)},
            ":zero": {"N": "0"},
            ":one": {"N": "1"},
        }
        if extra:
            update += f", {extra}"
            values[":now"] = {"N": _time(now)}
        # False: a window at least as long is already open.
        self._table.update(
            key,
            update,
            condition="attribute_not_exists(slow_until) OR slow_until < :until",
            names={"#ttl": "ttl"},
            values=values,
        )

    def _back_off(self, attempt: int) -> None:
        self._sleep(random.uniform(0, min(0.05, 0.002 * (attempt + 1))))  # noqa: S311 - jitter


def _connection_cap(max_connections: int | None, *, slowed: bool) -> int | None:
    if not slowed:
        return max_connections
    return max(1, max_connections // 2) if max_connections else 1


def _refilled(item: dict[str, Any], pace: Pace, now: float) -> float:
    if "refilled_at" not in item:
        return pace.burst
    elapsed = max(0.0, now - number(item, "refilled_at"))
    return min(pace.burst, number(item, "tokens") + elapsed * pace.rate)


def _conn_key(integration_id: str) -> str:
    return f"gov#{integration_id}#conn"


def _rate_key(integration_id: str) -> str:
    return f"gov#{integration_id}#rate"


def _day_key(integration_id: str, day: str) -> str:
    return f"gov#{integration_id}#day#{day}"


def _time(value: float) -> str:
    return num(value, places=6)


def _tokens(value: float) -> str:
    """Round down: a rounding error may only ever cost capacity, never add it."""
    return f"{math.floor(max(0.0, value) * 1e9) / 1e9:.9f}"
