"""The per-mailbox send governor: the same limits across every sender environment.

Microsoft 365 allows 3 concurrent SMTP connections and 30 messages a minute per mailbox; Gmail
and Workspace have daily caps. Each integration's ``limits`` (``integration.effective_limits()``)
are enforced with three small DynamoDB items, each written only by a conditional update:

- ``gov#<id>#conn`` — the connection semaphore: a map of slot → lease expiry. A slot is taken by
  rewriting the map of live leases plus the new one, on condition that ``version`` is still the
  one read; a holder that dies leaves a lease that simply expires.
- ``gov#<id>#rate`` — a token bucket for messages per minute. It holds ``burst = max(1, n // 10)``
  tokens and refills one every ``spacing = 60 / (n - burst + 1)`` seconds, so no 60-second window
  ever holds more than ``n`` messages, bursts included. It is stored as ``tat``, the time at which
  it is full again (GCRA's theoretical arrival time): at ``now`` it holds
  ``min(burst, burst - (tat - now) / spacing)`` tokens, and taking ``k`` moves ``tat`` to
  ``max(tat, now) + k * spacing`` — the same bucket, with one number instead of two. So a batch
  takes its places with one write that needs no read: ``SET tat = :now + k·spacing`` on condition
  the bucket is full (no item, or ``tat <= now``), or ``SET tat = tat + k·spacing`` on condition
  ``now <= tat <= now + (burst - k)·spacing``, which of the two from what this environment last
  left. A refused write answers the stored item (``ReturnValuesOnConditionCheckFailure``); the
  exact grant is computed on it and written on its ``version``, as the other items are. Every
  write moves ``version``, so :meth:`SendGovernor.give_back` returns unused places only when
  nobody wrote since. Times are whole microseconds, rounded against the caller (comparisons use
  the microsecond before the clock, writes the one after, spacings round up). An item written as
  ``tokens`` and ``refilled_at`` is read as that bucket and rewritten as ``tat`` on its next write
  (both guessed writes fail on it; an item with both is read as the stricter).
- ``gov#<id>#day#<YYYY-MM-DD>`` — recipients sent on that UTC day, counted with a conditional
  ``ADD`` that refuses to pass the cap (a single message larger than the whole cap goes through on
  an otherwise empty day, so it is never held back forever).

A throttling reply (432, 421, 451 4.7.x, 454, 450 4.2.1) calls :meth:`SendGovernor.slow_down`,
which opens a slow-down window on both items: the bucket is emptied (``slowed_at``: its next
token is one slowed spacing later), refills at half the rate with a burst of one, and new
connections are capped at half of ``max_connections`` (one when the integration sets no
connection limit). Capacity already in use is not revoked. The guessed writes fail inside a
window, so its places are always taken by the exact write; when it ends, ``tat`` is read under
the full pace again.

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
from decimal import Decimal
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
    ``version`` is the bucket's version the taking write left (None: no rate limit), ``spacing``
    the microseconds one place is worth in the pace it was taken under."""

    integration_id: str
    granted: int
    version: int | None
    spacing: int = 0


@dataclass(frozen=True)
class Pace:
    """Messages per second refilled into a bucket holding at most ``burst`` tokens; ``spacing``
    is the microseconds one token takes to refill, rounded up."""

    rate: float
    burst: float
    spacing: int

    @classmethod
    def of(cls, messages_per_minute: int, *, slowed: bool) -> Pace:
        if slowed:
            return cls(
                rate=messages_per_minute / 120.0,
                burst=1.0,
                spacing=-(-120 * _MICROS // messages_per_minute),
            )
        burst = max(1, messages_per_minute // 10)
        refilled = messages_per_minute - burst + 1  # per minute
        return cls(rate=refilled / 60.0, burst=float(burst), spacing=-(-60 * _MICROS // refilled))


class SendGovernor:
    def __init__(
        self,
        dynamodb_client: Any,
        table: str,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        busy_retry_seconds: float = 5.0,
        known_tats: dict[tuple[str, str], int] | None = None,
    ) -> None:
        """``busy_retry_seconds`` caps the delay given when every connection is taken: a live
        holder usually releases long before its lease expires. ``known_tats``: each bucket's
        ``tat`` as the governor last left or saw it, which decides the write tried first; pass
        one kept for the execution environment's life so the next invocation guesses right
        (a wrong guess costs one more write, never a limit)."""
        self._table = Table(dynamodb_client, table, purpose="for the send governor")
        self._clock = clock
        self._sleep = sleep
        self._busy_retry = busy_retry_seconds
        self._known_tat = known_tats if known_tats is not None else {}

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
        daily cap, or raise :class:`GovernorDelay`: a place the daily cap refuses goes back into
        the pace (unless another environment wrote the bucket since, which only makes the pace
        stricter for a moment)."""
        grant = self.take_messages(integration_id, limits, 1)
        try:
            self.count_recipients(integration_id, limits, recipients)
        except BaseException:
            self.give_back(grant, 1)
            raise

    def take_messages(self, integration_id: str, limits: Limits, wanted: int) -> RateGrant:
        """Take up to ``wanted`` messages' places in the integration's pace: as many as the
        bucket holds now (at least one, or :class:`GovernorDelay`). One conditional write when
        the bucket is as this governor expects it (full, or still within reach of what it last
        left); otherwise that write answers the stored item, and one exact write on its version
        follows, with no read. Places a batch does not use go back with :meth:`give_back`. The
        daily recipient cap is counted per message, with :meth:`count_recipients`."""
        wanted = max(1, wanted)
        per_minute = limits.messages_per_minute
        if not per_minute:
            return RateGrant(integration_id, wanted, None)
        key = _rate_key(integration_id)
        known = (self._table.name, key)
        current: dict[str, Any] | None = None  # the item as the last refused write answered it
        for attempt in range(_ATTEMPTS):
            now = _Now.read(self._clock)
            if current is None:
                write = _guessed(self._known_tat.get(known), per_minute, wanted, now)
            else:
                write = _exact(current, per_minute, wanted, now)  # or GovernorDelay
            written, answer = self._table.update_or_current(
                key, write.expression, condition=write.condition, names={"#ttl": "ttl"}, values=write.values
            )
            if written:  # ``answer``: the item before the write
                before = answer or {}
                self._known_tat[known] = write.tat_after(before)
                return RateGrant(
                    integration_id, write.granted, (integer(before, "version") or 0) + 1, write.spacing
                )
            if current is not None:
                self._back_off(attempt)  # another environment wrote between two exact writes
            current = answer or {}
            if "tat" in current:
                self._known_tat[known] = _micros(current, "tat")
        raise GovernorDelay(_CONTENDED_RETRY, "contention")

    def give_back(self, grant: RateGrant, unused: int) -> None:
        """Return places a batch took and did not use, only if nobody wrote the bucket since:
        then the bucket is exactly as if they had never been taken. Otherwise they stay taken,
        which only slows the pace down for a moment (never past the limit)."""
        if unused <= 0 or grant.version is None:
            return
        key = _rate_key(grant.integration_id)
        known = (self._table.name, key)
        returned = unused * grant.spacing
        with contextlib.suppress(AwsUnavailable):
            given = self._table.update(
                key,
                "SET tat = tat - :returned",
                condition="version = :ours",
                values={":returned": {"N": _stamp(returned)}, ":ours": {"N": str(grant.version)}},
            )
            if given and known in self._known_tat:
                self._known_tat[known] -= returned

    def count_recipients(self, integration_id: str, limits: Any, recipients: int) -> None:
        """Count one message's recipients against the daily cap, or raise :class:`GovernorDelay`
        (nothing counted). Nothing to do when the integration has no daily cap."""
        if limits.recipients_per_day:
            self._count_recipients(integration_id, limits.recipients_per_day, recipients, self._clock())

    def slow_down(self, integration_id: str, *, seconds: float) -> None:
        """After a throttling reply: for ``seconds``, half the pace and half the connections."""
        now = self._clock()
        until = now + seconds
        # The bucket is empty under the slowed pace from ``slowed_at``: the next place is one
        # slowed spacing later (the pace, and so the spacing, is known when a place is taken).
        emptied = {":slowed_at": {"N": _stamp(math.ceil(now * _MICROS))}}
        self._open_window(_rate_key(integration_id), until, "slowed_at = :slowed_at", emptied)
        self._open_window(_conn_key(integration_id), until)

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

    def _open_window(
        self, key: str, until: float, extra: str = "", extra_values: dict[str, Any] | None = None
    ) -> None:
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
            values.update(extra_values or {})
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


# ---------------------------------------------------------------------- the message bucket

_MICROS = 1_000_000
# Every write of a bucket item moves its version (``give_back`` answers to it) and its expiry.
_BUMP = "version = if_not_exists(version, :zero) + :one, #ttl = :ttl"
# What a guessed write assumes besides the bucket's level: no slow-down window open, and no
# ``tokens``/``refilled_at`` written by an earlier version of this module.
_AS_GUESSED = (
    "(attribute_not_exists(slow_until) OR slow_until <= :before) AND attribute_not_exists(refilled_at)"
)


@dataclass(frozen=True)
class _Now:
    """The clock to the microsecond: ``before`` (rounded down) in every comparison, ``after``
    (rounded up) in every time written, so a rounding only ever costs capacity."""

    before: int
    after: int

    @classmethod
    def read(cls, clock: Callable[[], float]) -> _Now:
        moment = clock() * _MICROS
        return cls(math.floor(moment), math.ceil(moment))


@dataclass(frozen=True)
class _Write:
    """One conditional write taking ``granted`` places of ``spacing`` microseconds each."""

    granted: int
    spacing: int
    expression: str
    condition: str
    values: dict[str, Any]
    tat: int | None  # the tat it writes; None: the stored one moved by ``taken``

    def tat_after(self, before: dict[str, Any]) -> int:
        """The tat this write left on ``before``, the item as it was."""
        if self.tat is not None:
            return self.tat
        return _micros(before, "tat") + self.granted * self.spacing


def _guessed(known_tat: int | None, per_minute: int, wanted: int, now: _Now) -> _Write:
    """The write that needs no read when the bucket is as expected: a full bucket (no item, or
    one refilled by now) takes up to ``burst`` places; a bucket still refilling takes what its
    ``tat`` last known leaves, by moving the stored ``tat`` on. Either fails on an item in a
    slow-down window or one written before the bucket kept a ``tat``."""
    pace = Pace.of(per_minute, slowed=False)
    burst = int(pace.burst)
    values = _bump_values(now)
    values[":before"] = {"N": _stamp(now.before)}
    if known_tat is None or known_tat < now.after:
        granted = min(wanted, burst)
        tat = now.after + granted * pace.spacing
        values[":tat"] = {"N": _stamp(tat)}
        condition = f"(attribute_not_exists(pk) OR tat <= :before) AND {_AS_GUESSED}"
        return _Write(granted, pace.spacing, f"SET tat = :tat, {_BUMP}", condition, values, tat)
    granted = max(1, min(wanted, _places(known_tat, pace, now)))
    values[":after"] = {"N": _stamp(now.after)}
    # At least ``granted`` whole places: tat - now <= (burst - granted) spacings.
    values[":edge"] = {"N": _stamp(now.before + (burst - granted) * pace.spacing)}
    values[":taken"] = {"N": _stamp(granted * pace.spacing)}
    condition = f"tat >= :after AND tat <= :edge AND {_AS_GUESSED}"
    return _Write(granted, pace.spacing, f"SET tat = tat + :taken, {_BUMP}", condition, values, None)


def _exact(item: dict[str, Any], per_minute: int, wanted: int, now: _Now) -> _Write:
    """The places the stored ``item`` holds now, written on its version; or
    :class:`GovernorDelay` until the first place refills."""
    slowed = _micros(item, "slow_until") > now.before
    pace = Pace.of(per_minute, slowed=slowed)
    tat = _stored_tat(item, pace, now)
    if slowed:  # emptied when the window opened (an old window kept its tokens: read above)
        tat = max(tat, _micros(item, "slowed_at") + pace.spacing)
    places = _places(tat, pace, now)
    if places < 1:
        wait = tat - (int(pace.burst) - 1) * pace.spacing - now.before
        raise GovernorDelay((wait + 1) / _MICROS, "rate")
    granted = min(wanted, places)
    tat = max(tat, now.after) + granted * pace.spacing
    values = _bump_values(now)
    values[":tat"] = {"N": _stamp(tat)}
    version = integer(item, "version")
    if version is None:
        condition = "attribute_not_exists(version)"
    else:
        condition = "version = :seen"
        values[":seen"] = {"N": str(version)}
    expression = f"SET tat = :tat, {_BUMP} REMOVE tokens, refilled_at"
    return _Write(granted, pace.spacing, expression, condition, values, tat)


def _stored_tat(item: dict[str, Any], pace: Pace, now: _Now) -> int:
    """The item's theoretical arrival time: when the bucket is full again under ``pace`` (no
    bucket yet: a full one). An item with ``tokens`` and ``refilled_at`` was written before the
    bucket kept a ``tat``: the same bucket, converted (the later of the two when it has both)."""
    tat = max(now.before, _micros(item, "tat"))
    if "refilled_at" in item:
        tokens = _refilled(item, pace, now.before / _MICROS)
        tat = max(tat, now.after + math.ceil((pace.burst - tokens) * pace.spacing))
    return tat


def _places(tat: int, pace: Pace, now: _Now) -> int:
    """Whole places a bucket whose theoretical arrival time is ``tat`` holds now (< 1: none)."""
    return (int(pace.burst) * pace.spacing - max(0, tat - now.before)) // pace.spacing


def _bump_values(now: _Now) -> dict[str, Any]:
    return {
        ":zero": {"N": "0"},
        ":one": {"N": "1"},
        ":ttl": {"N": str(now.after // _MICROS + _TTL_GRACE)},
    }


def _micros(item: dict[str, Any], name: str) -> int:
    """A stored time (or span) in seconds as whole microseconds, rounded up; 0 when absent."""
    return math.ceil(Decimal(item[name]["N"]) * _MICROS) if name in item else 0


def _stamp(micros: int) -> str:
    """Whole microseconds as DynamoDB's ``N`` text in seconds, exactly."""
    return f"{Decimal(micros).scaleb(-6):f}"


def _refilled(item: dict[str, Any], pace: Pace, now: float) -> float:
    """The tokens of a bucket written as ``tokens`` and ``refilled_at``."""
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
