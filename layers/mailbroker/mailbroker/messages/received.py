"""A message received from the send queue: the SQS record parsed, and how it ends when it is not
sent now.

:class:`QueuedRecord` is the part of an SQS record the sender needs. :class:`Outcomes` settles a
record that was not sent:

- put back without counting an attempt (another sender holds the id, the integration's pace is
  reached, too little time is left): ``ChangeMessageVisibility`` and :class:`RetryLater`;
- retried after a retryable error: status ``retrying``, put back with the retry schedule's delay,
  :class:`RetryLater`; past the maximum age, or on the queue's last receive, it expires instead;
- failed for good: status ``failed``, moved to the dead-letter queue with the error attached,
  and the record is deleted (the handler returns normally instead of looping).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mailbroker.errors import MailbrokerError
from mailbroker.messages.queue import QueueActions
from mailbroker.messages.retry import is_expired, retry_delay
from mailbroker.messages.status import (
    MessageRecord,
    MessageStatusStore,
    StatusConflict,
    attempts_so_far,
    error_record,
    is_new_cycle,
)
from mailbroker.observability import integration_metric, logger

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

    from mailbroker.seams import Governor

# A message that cannot go to the dead-letter queue stays on the send queue this long.
DEAD_LETTER_RETRY_SECONDS = 60
# Failures after which the integration's pace is slowed and the rest of the batch waits.
SLOWS_DOWN = frozenset({"throttled", "quota_exceeded"})
# Every put-back spends one receive of the send queue's maxReceiveCount. A message put back again
# and again waits a little longer each time (its receive count ÷ this), so the template's budget
# of 100 receives lasts over twenty minutes: longer than the longest hold on a connection slot, a
# parked session's lease of about ten minutes in an environment Lambda no longer invokes.
PUT_BACK_RECEIVES_PER_SECOND = 4


def put_back_delay(seconds: float, receive_count: int) -> int:
    """The whole seconds a message put back on its ``receive_count``-th receive waits: what was
    asked, at least one, and at least the receive count ÷ :data:`PUT_BACK_RECEIVES_PER_SECOND`."""
    return max(1, math.ceil(seconds), math.ceil(receive_count / PUT_BACK_RECEIVES_PER_SECOND))


_ID = re.compile(r"^[\x21-\x7e]{1,256}$")
_DECLARED = r'"{name}"\s*:\s*"([\x21\x23-\x5b\x5d-\x7e]{{1,256}})"'


class RetryLater(Exception):
    """Raised for a record that is back on the queue: the batch reports it as failed."""

    def __init__(self, message_id: str, seconds: int, reason: str) -> None:
        super().__init__(f"message {message_id!r} back on the queue in {seconds} s: {reason}")
        self.message_id = message_id
        self.seconds = seconds
        self.reason = reason


class Deferred(Exception):
    """Not an attempt: put the message back for ``retry_after`` seconds, attempts unchanged.
    ``code`` is what the wait is reported as if the queue allows no further receive."""

    def __init__(self, retry_after: float, reason: str, *, code: str = "smtp_transient") -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class QueuedRecord:
    """The parts of an SQS record delivery needs."""

    sqs_message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at: float  # seconds since the epoch
    attributes: dict[str, str]
    sender_id: str = ""  # SQS's SenderId: who sent it (AROA…:session for a role), set by SQS

    @classmethod
    def from_sqs(cls, record: SQSRecord | dict[str, Any]) -> QueuedRecord:
        """From a Powertools ``SQSRecord`` (or the raw event record dict)."""
        raw = record.raw_event if hasattr(record, "raw_event") else record
        attributes = raw.get("attributes") or {}
        message_attributes = {
            name: value.get("stringValue") or value.get("StringValue") or ""
            for name, value in (raw.get("messageAttributes") or {}).items()
            if isinstance(value, dict)
        }
        return cls(
            sqs_message_id=raw["messageId"],
            receipt_handle=raw["receiptHandle"],
            body=raw.get("body") or "",
            receive_count=int(attributes.get("ApproximateReceiveCount", "1")),
            sent_at=int(attributes.get("SentTimestamp", "0")) / 1000.0,
            attributes=message_attributes,
            sender_id=str(attributes.get("SenderId") or ""),
        )

    @property
    def redriven(self) -> bool:
        """Moved back from the dead-letter queue by an operator (it carries the error attached)."""
        return bool(self.attributes.get("error_code"))

    def declared(self, name: str) -> str | None:
        """A top-level string field of a body that failed validation, if one can be found."""
        try:
            data = json.loads(self.body)
        except (ValueError, RecursionError):
            match = re.search(_DECLARED.format(name=name), self.body)
            return match.group(1) if match else None
        value = data.get(name) if isinstance(data, dict) else None
        return value if isinstance(value, str) and _ID.match(value) else None


@dataclass
class Attempt:
    """What one attempt at a record knows about its message and status record."""

    message_id: str
    integration_id: str | None = None
    seen: MessageRecord | None = None  # the record as this attempt last read or wrote it
    before: MessageRecord | None = None  # the record as it was when this attempt began
    loaded: bool = False  # the status record was read (``seen`` is meaningful)
    context: dict[str, str] | None = None  # what a hint may name about the integration


class Outcomes:
    """How a record that was not sent ends: put back, retried, expired or dead-lettered, with its
    status record written to match (unless another copy's outcome owns it)."""

    def __init__(
        self,
        *,
        statuses: MessageStatusStore,
        queue: QueueActions,
        holder: str,
        max_message_age_seconds: float,
        governor: Governor | None = None,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.statuses = statuses
        self.queue = queue
        self.holder = holder
        self.max_message_age_seconds = max_message_age_seconds
        self.governor = governor
        self._clock = clock
        self._uniform = uniform

    def put_back(self, item: QueuedRecord, attempt: Attempt, seconds: float, reason: str, code: str) -> str:
        """Back on the queue without counting an attempt; raises :class:`RetryLater`."""
        if self._last_receive(item):
            return self.expire(item, attempt, MailbrokerError(reason, code=code), item.receive_count)
        delay = put_back_delay(seconds, item.receive_count)
        self.queue.delay(item.receipt_handle, delay)
        logger.info(
            "message put back without counting an attempt",
            extra={"message_id": attempt.message_id, "delay_seconds": delay, "reason": reason},
        )
        raise RetryLater(attempt.message_id, delay, reason)

    def retry(self, item: QueuedRecord, attempt: Attempt, error: MailbrokerError) -> str:
        """Status ``retrying`` and back on the queue after the retry schedule's delay (raises
        :class:`RetryLater`), or expired when too old or on the queue's last receive."""
        now = self._clock()
        seen = attempt.seen
        attempts = attempts_so_far(seen, now) + 1 if attempt.loaded else item.receive_count
        started = self._cycle_start(item, attempt.before, now)
        if is_expired(started, now, max_age_seconds=self.max_message_age_seconds) or self._last_receive(item):
            return self.expire(item, attempt, error, attempts)

        delay = retry_delay(attempts, retry_after=error.retry_after, uniform=self._uniform)
        integration_id = attempt.integration_id or "unknown"
        if error.code in SLOWS_DOWN and self.governor is not None and attempt.integration_id:
            try:
                self.governor.slow_down(attempt.integration_id, seconds=delay)
            except MailbrokerError:
                logger.warning("could not slow the governor down", extra={"integration": integration_id})
            except Exception:
                # A bug in the governor: this message is retried for its own reason all the same.
                logger.exception("could not slow the governor down", extra={"integration": integration_id})
        if attempt.loaded and not settled_elsewhere(seen, self.holder, now):
            try:
                self.statuses.retrying(
                    attempt.message_id,
                    attempt.integration_id,
                    seen,
                    error=error_record(error),
                    attempts=attempts,
                    next_attempt_at=now + delay,
                )
            except (StatusConflict, MailbrokerError) as exc:
                logger.warning(
                    "could not record the retry", extra={"message_id": attempt.message_id, "why": str(exc)}
                )
        self.queue.delay(item.receipt_handle, delay)
        logger.warning(
            "message will be retried",
            extra={
                "message_id": attempt.message_id,
                "integration": integration_id,
                "code": error.code,
                "error": error.message,
                "attempts": attempts,
                "delay_seconds": delay,
            },
        )
        integration_metric("MessagesRetried", integration_id, 1, code=error.code)
        raise RetryLater(attempt.message_id, delay, error.code)

    def _load_for_outcome(self, attempt: Attempt) -> None:
        """A message that fails before its id was claimed (put back on its last receive while it
        waited for a connection slot) still gets its status record: read it first, as the claim
        would have. A store that cannot answer leaves the dead letter to carry the outcome."""
        if attempt.loaded or not attempt.message_id:
            return
        try:
            attempt.seen = attempt.before = self.statuses.load(attempt.message_id)
        except MailbrokerError:
            return
        attempt.loaded = True

    def _cycle_start(self, item: QueuedRecord, before: MessageRecord | None, now: float) -> float:
        """When the current delivery of the id began: the queue's SentTimestamp, or the moment
        it came back after a failure (a re-drive starts the clock again)."""
        start = item.sent_at or now
        if before is None:
            return start
        if is_new_cycle(before, now):
            return now if before.is_live(now) else start
        return max(start, before.cycle_started_at)

    def _last_receive(self, item: QueuedRecord) -> bool:
        """True when SQS would move the message to the dead-letter queue on its next receive
        (the send queue's maxReceiveCount): better to dead-letter it here, with its error."""
        limit = self.queue.max_receive_count()
        return limit is not None and item.receive_count >= limit

    def expire(self, item: QueuedRecord, attempt: Attempt, error: MailbrokerError, attempts: int) -> str:
        """Fails as ``expired``, with ``error`` as the last error."""
        hours = self.max_message_age_seconds / 3600
        if self._last_receive(item):
            why = f"received {item.receive_count} times, the send queue's maxReceiveCount"
        else:
            why = f"older than {hours:g} h"
        expired = MailbrokerError(
            f"still failing after {attempts} attempts, {why}; last error {error.code}: {error.message}",
            code="expired",
        )
        return self.give_up(item, attempt, expired, last_error=error)

    def give_up(
        self,
        item: QueuedRecord,
        attempt: Attempt,
        error: MailbrokerError,
        *,
        last_error: MailbrokerError | None = None,
    ) -> str:
        """Status ``failed`` and the message to the dead-letter queue with the error attached.
        When the dead-letter queue cannot take it, it stays on the send queue (:class:`RetryLater`)."""
        now = self._clock()
        integration_id = attempt.integration_id
        recorded = error_record(error)
        if last_error is not None:
            recorded["last_error"] = error_record(last_error)
        self._load_for_outcome(attempt)
        if attempt.loaded and not settled_elsewhere(attempt.seen, self.holder, now):
            try:
                self.statuses.failed(
                    attempt.message_id,
                    integration_id,
                    attempt.seen,
                    error=recorded,
                    attempts=attempts_so_far(attempt.seen, now) + 1,
                )
            except (StatusConflict, MailbrokerError) as exc:
                logger.warning(
                    "could not record the failure", extra={"message_id": attempt.message_id, "why": str(exc)}
                )
            except Exception:
                # A bug in the status store: the dead letter below still carries the outcome.
                logger.exception("could not record the failure", extra={"message_id": attempt.message_id})
        hint = error.hint if last_error is None else f"{error.hint} Last error: {last_error.hint}"
        try:
            self.queue.dead_letter(
                item.body,
                {
                    "error_code": error.code,
                    "error_message": error.message,
                    "error_hint": hint,
                    "integration": integration_id,
                    "message_id": attempt.message_id,
                },
            )
        except MailbrokerError as exc:
            logger.error(
                "could not move a failed message to the dead-letter queue; it stays on the send queue",
                extra={"message_id": attempt.message_id, "why": exc.message},
            )
            self.queue.delay(item.receipt_handle, DEAD_LETTER_RETRY_SECONDS)
            raise RetryLater(
                attempt.message_id, DEAD_LETTER_RETRY_SECONDS, "dead-letter queue unavailable"
            ) from exc
        logger.warning(
            "message failed and moved to the dead-letter queue",
            extra={
                "message_id": attempt.message_id,
                "integration": integration_id,
                "code": error.code,
                "error": error.message,
            },
        )
        integration_metric("MessagesFailed", integration_id or "unknown", 1, code=error.code)
        return "failed"


def internal_error(exc: BaseException) -> MailbrokerError:
    """An unexpected exception (a bug) as the ``internal_error`` a message fails with."""
    return MailbrokerError(
        f"unexpected {type(exc).__name__}",
        code="internal_error",
        hint="A bug in mailbroker, logged with its stack trace (without credentials); the message "
        "was not retried. Re-drive it from the dead-letter queue once the fix is deployed.",
    )


def settled_elsewhere(seen: MessageRecord | None, holder: str, now: float) -> bool:
    """The record belongs to another copy's outcome (sent, or being sent by a live sender): a
    failure of this copy must not overwrite it."""
    if seen is None or not seen.is_live(now):
        return False
    if seen.status == "sent":
        return True
    return seen.lease_held(now) and seen.lease_owner != holder
