"""Delivering one SQS batch: each queued message becomes one SMTP transaction, at most once.

``Delivery.handle_record`` is the batch processor's record handler. For each record it:

1. parses the message (invalid input fails for good: status ``failed``, dead-letter queue);
2. reads the id's status record: ``sent`` inside the idempotency window means a duplicate (the
   record is deleted from the queue, nothing is sent); ``sending`` under another sender's live
   lease puts the copy back until the lease ends; ``sending`` whose sender vanished means the
   message may have been delivered (``delivery_uncertain``: never resent automatically);
3. checks the integration allows the sender and usage, opens (once per integration per batch)
   an authenticated SMTP session, asks the send governor for capacity;
4. claims the id with a conditional write (status ``sending``), sends, records ``sent`` with the
   server's final reply and any refused recipients.

Every failure is a classified :class:`MailbrokerError`. Retryable ones put the message back on
the queue with the retry schedule's delay (``ChangeMessageVisibility``), status ``retrying``, and
raise :class:`RetryLater` so the batch reports the record as failed; past the maximum age they
fail as ``expired``. Permanent ones record ``failed``, move the message to the dead-letter queue
with the error attached and return normally, so the record is deleted instead of looping.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mailbroker.errors import InvalidMessage, MailbrokerError, SmtpFailure, classify_exception
from mailbroker.governor import GovernorDelay
from mailbroker.integrations import BasicIntegration
from mailbroker.messages.mime import build_mime, envelope
from mailbroker.messages.models import OutgoingMessage, check_allowed, parse_message
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
from mailbroker.observability import logger, metrics

# A claimed id whose sender shows no sign of life for this long is taken for dead. Longer than
# the sender function's timeout, so a live sender never loses its claim.
DEFAULT_LEASE_SECONDS = 300.0
# Left-over time below which a message is not started: a send cut off by the function's timeout
# after the body went out would leave the delivery uncertain.
DEFAULT_MIN_REMAINING_MS = 20_000
# A governor delay this short is waited out in the batch, on the open connection, instead of
# putting the message back on the queue (which would spend one of its SQS receives); the waits
# of one batch add up to at most the budget.
DEFAULT_MAX_INLINE_WAIT = 5.0
DEFAULT_INLINE_WAIT_BUDGET = 30.0
# A message that cannot go to the dead-letter queue stays on the send queue this long.
DEAD_LETTER_RETRY_SECONDS = 60
_ID = re.compile(r"^[\x21-\x7e]{1,256}$")
_DECLARED = r'"{name}"\s*:\s*"([\x21\x23-\x5b\x5d-\x7e]{{1,256}})"'


class RetryLater(Exception):
    """Raised for a record that is back on the queue: the batch reports it as failed."""

    def __init__(self, message_id: str, seconds: int, reason: str) -> None:
        super().__init__(f"message {message_id!r} back on the queue in {seconds} s: {reason}")
        self.message_id = message_id
        self.seconds = seconds
        self.reason = reason


class _Deferred(Exception):
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

    @classmethod
    def from_sqs(cls, record: Any) -> QueuedRecord:
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
        )

    @property
    def redriven(self) -> bool:
        """Moved back from the dead-letter queue by an operator (it carries the error attached)."""
        return bool(self.attributes.get("error_code"))


@dataclass
class _Attempt:
    message_id: str
    integration_id: str | None = None
    seen: MessageRecord | None = None  # the record as this attempt last read or wrote it
    before: MessageRecord | None = None  # the record as it was when this attempt began
    loaded: bool = False  # the status record was read (``seen`` is meaningful)


class Delivery:
    """One batch's worth of SMTP delivery. Build one per invocation, call :meth:`close` after."""

    def __init__(
        self,
        *,
        statuses: MessageStatusStore,
        queue: QueueActions,
        integrations: Any,
        token_broker: Any,
        max_message_age_seconds: float,
        governor: Any = None,
        session_factory: Callable[..., Any] | None = None,
        ssl_context: Any = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        remaining_ms: Callable[[], int] | None = None,
        min_remaining_ms: int = DEFAULT_MIN_REMAINING_MS,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[float, float], float] = random.uniform,
        sleep: Callable[[float], None] = time.sleep,
        max_inline_wait: float = DEFAULT_MAX_INLINE_WAIT,
        inline_wait_budget: float = DEFAULT_INLINE_WAIT_BUDGET,
    ) -> None:
        self.statuses = statuses
        self.queue = queue
        self.integrations = integrations
        self.governor = governor
        self.max_message_age_seconds = max_message_age_seconds
        self.lease_seconds = lease_seconds
        self.holder = uuid.uuid4().hex
        self._remaining_ms = remaining_ms
        self._min_remaining_ms = min_remaining_ms
        self._clock = clock
        self._uniform = uniform
        self._sleep = sleep
        self._max_inline_wait = max_inline_wait
        self._inline_budget = inline_wait_budget
        self.sessions = SessionPool(
            token_broker,
            governor=governor,
            holder=self.holder,
            lease_seconds=lease_seconds,
            session_factory=session_factory,
            ssl_context=ssl_context,
            clock=clock,
        )

    def close(self) -> None:
        """QUIT every session the batch opened and release its connection slots."""
        self.sessions.close_all()

    # ------------------------------------------------------------------ one record

    def handle_record(self, record: Any) -> str:
        """The batch processor's record handler. Returns how the record ended (``sent``,
        ``duplicate``, ``failed``); raises :class:`RetryLater` when it is back on the queue."""
        item = QueuedRecord.from_sqs(record)
        attempt = _Attempt(message_id=item.sqs_message_id)
        try:
            return self._deliver(item, attempt)
        except _Deferred as delay:
            return self._put_back(item, attempt, delay.retry_after, delay.reason, delay.code)
        except GovernorDelay as delay:
            reason = f"the integration's {delay.reason} limit is reached"
            return self._put_back(item, attempt, delay.retry_after, reason, "throttled")
        except MailbrokerError as exc:
            if exc.retryable:
                return self._retry(item, attempt, exc)
            return self._give_up(item, attempt, exc)
        except Exception as exc:
            logger.exception(
                "unexpected failure delivering a message",
                extra={"message_id": attempt.message_id, "integration": attempt.integration_id},
            )
            return self._retry(item, attempt, classify_exception(exc))

    def _deliver(self, item: QueuedRecord, attempt: _Attempt) -> str:
        try:
            message = parse_message(item.body)
        except InvalidMessage:
            attempt.message_id = _declared(item.body, "id") or item.sqs_message_id
            attempt.integration_id = _declared(item.body, "integration")
            self._load(attempt)
            raise
        attempt.message_id = message.id or item.sqs_message_id
        attempt.integration_id = message.integration
        if message.id is None:
            message = message.with_id(attempt.message_id)
        self._load(attempt)
        if self._already_handled(item, attempt):
            return "duplicate"

        integration = self.integrations.get(message.integration)
        check_allowed(message, integration)
        self._check_time_left(integration)
        session = self.sessions.session_for(integration)
        mail_from, rcpts = envelope(message)
        if self.governor is not None:
            self._take_message(integration, len(rcpts))
        data = self._mime(message, item)

        try:
            attempt.seen = self.statuses.start_sending(
                attempt.message_id,
                integration.id,
                attempt.seen,
                holder=self.holder,
                lease_seconds=self.lease_seconds,
            )
        except StatusConflict:
            # Another copy of this id moved its record since we read it: decide again from it.
            self._load(attempt)
            if self._already_handled(item, attempt):
                return "duplicate"
            raise _Deferred(1, "the status record changed while claiming it") from None

        started = time.monotonic()
        try:
            result = session.send(mail_from, rcpts, data, smtputf8=message.needs_smtputf8)
        except SmtpFailure as exc:
            # The session reconnects by itself after a dropped connection; a throttled server is
            # left alone by the rest of the batch.
            if exc.code == "throttled":
                self.sessions.hold_off(integration.id, exc)
            raise
        finally:
            _metric("SmtpDurationMs", integration.id, (time.monotonic() - started) * 1000, "Milliseconds")
        self._record_sent(attempt, integration.id, result)
        return "sent"

    def _already_handled(self, item: QueuedRecord, attempt: _Attempt) -> bool:
        """True for a duplicate; raises when the record says to wait or to stop."""
        seen = attempt.seen
        now = self._clock()
        if seen is None or not seen.is_live(now):
            return False
        if seen.status == "sent":
            logger.info(
                "duplicate of a sent message: not sent again",
                extra={"message_id": seen.id, "sqs_message_id": item.sqs_message_id},
            )
            _metric("MessagesDuplicate", seen.integration or attempt.integration_id or "unknown", 1)
            return True
        if seen.status == "sending":
            if seen.lease_held(now):
                raise _Deferred(seen.lease_until - now + 1, "another sender holds this id")
            raise MailbrokerError(
                "a sender claimed this message and stopped before recording the outcome: "
                "the server may have accepted it",
                code="delivery_uncertain",
            )
        if (
            seen.status == "failed"
            and (seen.last_error or {}).get("code") == "delivery_uncertain"
            and not item.redriven
        ):
            # The copy whose delivery is uncertain came back (its dead-lettering failed): only an
            # operator's re-drive may send it again.
            raise MailbrokerError(
                (seen.last_error or {}).get("message") or "delivery uncertain", code="delivery_uncertain"
            )
        return False

    def _take_message(self, integration: Any, recipients: int) -> None:
        """Take the message's place in the integration's pace, waiting out a short delay."""
        while True:
            try:
                self.governor.take_message(
                    integration.id, integration.effective_limits(), recipients=recipients
                )
                return
            except GovernorDelay as delay:
                wait = delay.retry_after
                if (
                    wait > self._max_inline_wait
                    or wait > self._inline_budget
                    or not self._time_for(wait, integration)
                ):
                    raise
                self._inline_budget -= wait
                self._sleep(wait)

    def _time_for(self, wait: float, integration: Any) -> bool:
        if self._remaining_ms is None:
            return True
        needed = max(self._min_remaining_ms, int(integration.smtp.timeout_seconds * 1000))
        return self._remaining_ms() - wait * 1000 >= needed

    def _check_time_left(self, integration: Any) -> None:
        if self._remaining_ms is None:
            return
        needed = max(self._min_remaining_ms, int(integration.smtp.timeout_seconds * 1000))
        if self._remaining_ms() < needed:
            raise _Deferred(1, "not enough time left in this invocation to send safely")

    def _mime(self, message: OutgoingMessage, item: QueuedRecord) -> bytes:
        # Date is when the message was queued, so every attempt sends the same bytes.
        when = datetime.fromtimestamp(item.sent_at, UTC) if item.sent_at else None
        return build_mime(message, message_id_domain=message.from_.domain, now=when).as_bytes()

    def _record_sent(self, attempt: _Attempt, integration_id: str, result: Any) -> None:
        refused = [
            {"recipient": recipient, "reply": str(reply)} for recipient, reply in _refused(result).items()
        ]
        reply = str(result.reply)
        try:
            self.statuses.sent(attempt.message_id, integration_id, attempt.seen, reply=reply, refused=refused)
        except MailbrokerError:
            # The server has the message: deleting it from the queue is what prevents a resend.
            logger.error(
                "message sent but its status could not be recorded",
                extra={"message_id": attempt.message_id, "integration": integration_id, "reply": reply},
            )
        logger.info(
            "message sent",
            extra={
                "message_id": attempt.message_id,
                "integration": integration_id,
                "reply": reply,
                "refused": len(refused),
            },
        )
        _metric("MessagesSent", integration_id, 1)
        if refused:
            _metric("RecipientsRefused", integration_id, len(refused))

    # ------------------------------------------------------------------ outcomes

    def _load(self, attempt: _Attempt) -> None:
        attempt.seen = self.statuses.load(attempt.message_id)
        if not attempt.loaded:
            attempt.before = attempt.seen
        attempt.loaded = True

    def _put_back(self, item: QueuedRecord, attempt: _Attempt, seconds: float, reason: str, code: str) -> str:
        if self._last_receive(item):
            return self._expire(item, attempt, MailbrokerError(reason, code=code), item.receive_count)
        delay = max(1, math.ceil(seconds))
        self.queue.delay(item.receipt_handle, delay)
        logger.info(
            "message put back without counting an attempt",
            extra={"message_id": attempt.message_id, "delay_seconds": delay, "reason": reason},
        )
        raise RetryLater(attempt.message_id, delay, reason)

    def _retry(self, item: QueuedRecord, attempt: _Attempt, error: MailbrokerError) -> str:
        now = self._clock()
        seen = attempt.seen
        attempts = attempts_so_far(seen, now) + 1 if attempt.loaded else item.receive_count
        started = self._cycle_start(item, attempt.before, now)
        if is_expired(started, now, max_age_seconds=self.max_message_age_seconds) or self._last_receive(item):
            return self._expire(item, attempt, error, attempts)

        delay = retry_delay(attempts, retry_after=error.retry_after, uniform=self._uniform)
        integration_id = attempt.integration_id or "unknown"
        if error.code == "throttled" and self.governor is not None and attempt.integration_id:
            try:
                self.governor.slow_down(attempt.integration_id, seconds=delay)
            except Exception:
                logger.warning("could not slow the governor down", extra={"integration": integration_id})
        if attempt.loaded and not _settled_elsewhere(seen, self.holder, now):
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
        _metric("MessagesRetried", integration_id, 1, code=error.code)
        raise RetryLater(attempt.message_id, delay, error.code)

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

    def _expire(self, item: QueuedRecord, attempt: _Attempt, error: MailbrokerError, attempts: int) -> str:
        hours = self.max_message_age_seconds / 3600
        if self._last_receive(item):
            why = f"received {item.receive_count} times, the send queue's maxReceiveCount"
        else:
            why = f"older than {hours:g} h"
        expired = MailbrokerError(
            f"still failing after {attempts} attempts, {why}; last error {error.code}: {error.message}",
            code="expired",
        )
        return self._give_up(item, attempt, expired, last_error=error)

    def _give_up(
        self,
        item: QueuedRecord,
        attempt: _Attempt,
        error: MailbrokerError,
        *,
        last_error: MailbrokerError | None = None,
    ) -> str:
        now = self._clock()
        integration_id = attempt.integration_id
        recorded = error_record(error)
        if last_error is not None:
            recorded["last_error"] = error_record(last_error)
        if attempt.loaded and not _settled_elsewhere(attempt.seen, self.holder, now):
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
        _metric("MessagesFailed", integration_id or "unknown", 1, code=error.code)
        return "failed"


def _settled_elsewhere(seen: MessageRecord | None, holder: str, now: float) -> bool:
    """The record belongs to another copy's outcome (sent, or being sent by a live sender): a
    failure of this copy must not overwrite it."""
    if seen is None or not seen.is_live(now):
        return False
    if seen.status == "sent":
        return True
    return seen.lease_held(now) and seen.lease_owner != holder


def _declared(body: str, name: str) -> str | None:
    """A top-level string field of a body that failed validation, if one can be found."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        match = re.search(_DECLARED.format(name=name), body)
        return match.group(1) if match else None
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, str) and _ID.match(value) else None


def _refused(result: Any) -> dict[str, Any]:
    refused = getattr(result, "refused", None) or {}
    if isinstance(refused, dict):
        return refused
    return {str(recipient): reply for recipient, reply in refused}


def _metric(name: str, integration_id: str, value: float, unit: str = "Count", **dimensions: str) -> None:
    """One metric with the integration (and any other) dimension, flushed at once: a batch mixes
    integrations, so the handler's shared dimension set cannot carry them."""
    from aws_lambda_powertools.metrics import MetricUnit, single_metric

    try:
        with single_metric(
            name=name,
            unit=MetricUnit(unit),
            value=value,
            namespace=metrics.namespace,
            default_dimensions=metrics.default_dimensions,
        ) as metric:
            metric.add_dimension(name="integration", value=integration_id)
            for key, dimension in dimensions.items():
                metric.add_dimension(name=key, value=dimension)
    except Exception as exc:  # a metric never fails a delivery
        logger.debug("metric not emitted", extra={"metric": name, "why": type(exc).__name__})


# ---------------------------------------------------------------------------------------- sessions


class BrokerTokens:
    """The XOAUTH2 token provider of one integration's session: tokens from the broker; when a
    server refused one (``force_refresh=True``), the broker is told which, so it is never handed
    out again."""

    def __init__(self, broker: Any, integration_id: str) -> None:
        self._broker = broker
        self._integration_id = integration_id
        self._last: str | None = None

    def __repr__(self) -> str:
        return f"BrokerTokens({self._integration_id!r})"

    def __call__(self, force_refresh: bool = False) -> str:
        token = self._broker.token_for(
            self._integration_id,
            force_refresh=force_refresh,
            rejected_token=self._last if force_refresh else None,
        )
        self._last = token.access_token
        _metric("TokenSource", self._integration_id, 1, source=token.source)
        return token.access_token


@dataclass
class _Open:
    session: Any
    slot: Any = None


class SessionPool:
    """One authenticated SMTP session per integration for the batch, opened on first use.

    A failure to open is remembered for the batch: the other messages of that integration get
    the same error without asking the token endpoint or the server again. After a throttling
    reply, the integration's other messages are put back without an attempt.
    """

    def __init__(
        self,
        token_broker: Any,
        *,
        governor: Any = None,
        holder: str = "",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        session_factory: Callable[..., Any] | None = None,
        ssl_context: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._broker = token_broker
        self._governor = governor
        self._holder = holder
        self._lease_seconds = lease_seconds
        self._factory = session_factory
        self._ssl_context = ssl_context
        self._clock = clock
        self._open: dict[str, _Open] = {}
        self._broken: dict[str, MailbrokerError] = {}
        self._held_until: dict[str, tuple[float, str]] = {}

    def session_for(self, integration: Any) -> Any:
        held = self._held_until.get(integration.id)
        if held and held[0] > self._clock():
            raise _Deferred(held[0] - self._clock(), held[1], code="throttled")
        if integration.id in self._broken:
            raise self._broken[integration.id]
        entry = self._open.get(integration.id)
        if entry is not None:
            return entry.session
        slot = None
        if self._governor is not None:
            slot = self._governor.open_connection(
                integration.id,
                integration.effective_limits(),
                holder=self._holder,
                lease_seconds=self._lease_seconds,
            )
        session = self._new_session(integration)
        try:
            session.open()
        except BaseException as exc:
            self._release(slot)
            if isinstance(exc, MailbrokerError):
                if exc.code == "throttled":
                    self.hold_off(integration.id, exc)
                elif exc.code != "aws_unavailable":
                    self._broken[integration.id] = exc
            raise
        self._open[integration.id] = _Open(session, slot)
        return session

    def hold_off(self, integration_id: str, error: MailbrokerError) -> None:
        """After a throttling reply: the integration's other messages in this batch wait."""
        seconds = max(error.retry_after or 0.0, 60.0)
        self._held_until[integration_id] = (self._clock() + seconds, f"{integration_id} is throttled")

    def discard(self, integration_id: str) -> None:
        entry = self._open.pop(integration_id, None)
        if entry is not None:
            self._close(entry)

    def close_all(self) -> None:
        for integration_id in list(self._open):
            self.discard(integration_id)

    def connections(self) -> int:
        return len(self._open)

    def _new_session(self, integration: Any) -> Any:
        from mailbroker.smtp.transport import SmtpSession
        from mailbroker.smtp.xoauth2 import BasicAuth, XOAuth2Auth

        if isinstance(integration, BasicIntegration):
            auth: Any = BasicAuth(integration.password)
        else:
            auth = XOAuth2Auth(BrokerTokens(self._broker, integration.id))
        factory = self._factory or SmtpSession
        return factory(
            integration.smtp, username=integration.username, auth=auth, ssl_context=self._ssl_context
        )

    def _close(self, entry: _Open) -> None:
        try:
            entry.session.close()
        except Exception as exc:
            logger.debug("closing an SMTP session failed", extra={"why": type(exc).__name__})
        self._release(entry.slot)

    def _release(self, slot: Any) -> None:
        if slot is None or self._governor is None:
            return
        try:
            self._governor.release_connection(slot)
        except Exception as exc:
            logger.warning("could not release a connection slot", extra={"why": type(exc).__name__})
