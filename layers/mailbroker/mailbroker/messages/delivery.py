"""Delivering one SQS batch: each queued message becomes one SMTP transaction, at most once.

``Delivery.handle_record`` is the batch processor's record handler. For each record it:

1. parses the message (invalid input fails for good: status ``failed``, dead-letter queue);
2. checks the integration allows the sender and usage, opens (once per integration per batch)
   an authenticated SMTP session, asks the send governor for capacity (the batch's places in the
   integration's pace are taken in one write, :meth:`Delivery.expect`, and the unused given back);
3. claims the id with one conditional write (status ``sending``) that succeeds on a new, queued
   or retrying id without reading it first. When it does not hold, the write answers the stored
   record and the record decides: ``sent`` inside the idempotency window means a duplicate (the
   record is deleted from the queue, nothing is sent); ``sending`` under another sender's live
   lease puts the copy back until the lease ends; ``sending`` whose sender vanished means the
   message may have been delivered (``delivery_uncertain``: never resent automatically); a
   re-driven failure or a record past its window is claimed with a write on the version read;
4. sends, and notes ``sent`` with the server's final reply and any refused recipients. The
   batch's ``sent`` records are written together when the batch ends, 25 to a ``BatchWriteItem``
   (a write that need not check anything: the id is this sender's), and before a second copy of
   one of them reads or claims its record.

On the happy path that is one status write per message and one request per batch for the
``sent`` records; per batch, the governor's pace and, when a session is opened or parked, a write
for the connection slot. A sender that dies between a send and the end of its batch
leaves those messages ``sending``: they end as ``delivery_uncertain``, never sent twice.

Every failure is a classified :class:`MailbrokerError`. Retryable ones put the message back on
the queue with the retry schedule's delay (``ChangeMessageVisibility``), status ``retrying``, and
raise :class:`RetryLater` so the batch reports the record as failed; past the maximum age they
fail as ``expired``. Permanent ones record ``failed``, move the message to the dead-letter queue
with the error attached and return normally, so the record is deleted instead of looping. Any
other exception is a bug: the message fails at once as ``internal_error``, its traceback logged,
instead of being retried for a day as if AWS were down. A failure before the claim reads the
status record then, so its outcome is written on the record as it stands (and a copy of a message
already sent still ends as a duplicate).

The SQS record and these outcomes are in :mod:`mailbroker.messages.received`; the batch's SMTP
sessions in :mod:`mailbroker.messages.sessions`.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mailbroker.callers import Caller
from mailbroker.errors import InvalidMessage, MailbrokerError, SmtpFailure
from mailbroker.governor import GovernorDelay, RateGrant
from mailbroker.integrations import context_of
from mailbroker.messages.mime import build_mime, envelope
from mailbroker.messages.models import OutgoingMessage, check_allowed, parse_message, with_sender_defaults
from mailbroker.messages.queue import QueueActions, check_caller
from mailbroker.messages.received import (
    SLOWS_DOWN,
    Attempt,
    Deferred,
    Outcomes,
    QueuedRecord,
    RetryLater,
    internal_error,
)
from mailbroker.messages.recipients import Recipients, outstanding, refusals_of, settle
from mailbroker.messages.sessions import DEFAULT_LEASE_SECONDS, IdleSessions, SessionPool
from mailbroker.messages.status import ClaimRefused, MessageRecord, MessageStatusStore, StatusConflict
from mailbroker.observability import integration_metric, logger

if TYPE_CHECKING:
    import ssl

    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

    from mailbroker.integrations import Integration, Limits
    from mailbroker.messages.tracking import LinkTracker
    from mailbroker.seams import Governor, IntegrationSource, SessionFactory, TokenSource
    from mailbroker.smtp.transport import SendResult

__all__ = ["DEFAULT_LEASE_SECONDS", "Delivery", "RetryLater"]

# Left-over time below which a message is not started: a send cut off by the function's timeout
# after the body went out would leave the delivery uncertain.
DEFAULT_MIN_REMAINING_MS = 20_000
# A governor delay this short is waited out in the batch, on the open connection, instead of
# putting the message back on the queue (which would spend one of its SQS receives); the waits
# of one batch add up to at most the budget.
DEFAULT_MAX_INLINE_WAIT = 5.0
DEFAULT_INLINE_WAIT_BUDGET = 30.0
# ``sent`` records written in one request (DynamoDB's BatchWriteItem takes 25 items).
SENT_RECORDS_PER_WRITE = 25


@dataclass
class _Places:
    """Places in one integration's pace this batch holds and has not used yet."""

    grant: RateGrant
    left: int


class Delivery:
    """One batch's worth of SMTP delivery. Build one per invocation, call :meth:`close` after."""

    def __init__(
        self,
        *,
        statuses: MessageStatusStore,
        queue: QueueActions,
        integrations: IntegrationSource,
        token_broker: TokenSource,
        max_message_age_seconds: float,
        governor: Governor | None = None,
        session_factory: SessionFactory | None = None,
        ssl_context: ssl.SSLContext | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        remaining_ms: Callable[[], int] | None = None,
        min_remaining_ms: int = DEFAULT_MIN_REMAINING_MS,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[float, float], float] = random.uniform,
        sleep: Callable[[float], None] = time.sleep,
        max_inline_wait: float = DEFAULT_MAX_INLINE_WAIT,
        inline_wait_budget: float = DEFAULT_INLINE_WAIT_BUDGET,
        tracker: LinkTracker | None = None,
        idle_sessions: IdleSessions | None = None,
        api_sender_id: str = "",
    ) -> None:
        self.statuses = statuses
        # The HTTP API's role id: it checked the caller of every message it queued.
        self._api_sender_id = api_sender_id
        self.queue = queue
        self.integrations = integrations
        self.governor = governor
        self.max_message_age_seconds = max_message_age_seconds
        self.lease_seconds = lease_seconds
        self.holder = uuid.uuid4().hex
        # Open and click tracking (messages/tracking.py's LinkTracker); None: never tracked.
        self.tracker = tracker
        self._remaining_ms = remaining_ms
        self._min_remaining_ms = min_remaining_ms
        self._clock = clock
        self._sleep = sleep
        self._max_inline_wait = max_inline_wait
        self._inline_budget = inline_wait_budget
        self._expected: Counter[str] = Counter()  # records of the batch not started, by integration
        self._places: dict[str, _Places] = {}
        # ``sent`` records of this batch not written yet, by message id.
        self._unrecorded: dict[str, MessageRecord] = {}
        self.sessions = SessionPool(
            token_broker,
            governor=governor,
            holder=self.holder,
            lease_seconds=lease_seconds,
            session_factory=session_factory,
            ssl_context=ssl_context,
            clock=clock,
            idle=idle_sessions,
        )
        self.outcomes = Outcomes(
            statuses=statuses,
            queue=queue,
            holder=self.holder,
            max_message_age_seconds=max_message_age_seconds,
            governor=governor,
            clock=clock,
            uniform=uniform,
        )

    def expect(self, records: Iterable[Any]) -> None:
        """Note how many of the batch's records go to each integration, so the governor is asked
        once for the batch's places in an integration's pace instead of once per message."""
        for record in records:
            integration = QueuedRecord.from_sqs(record).declared("integration")
            if integration:
                self._expected[integration] += 1

    def close(self) -> None:
        """Write the batch's ``sent`` records; give back the pace the batch took and did not use;
        park the batch's healthy SMTP sessions in the execution environment (``idle_sessions``) or
        QUIT them, and release the slots of those closed."""
        self._write_sent()
        places, self._places = self._places, {}
        for held in places.values():
            if self.governor is None:
                break
            try:
                self.governor.give_back(held.grant, min(held.left, held.grant.granted))
            except Exception:
                # Places not given back only slow the pace down until they refill.
                logger.exception("could not give back unused places in the pace")
        self.sessions.close_all()

    # ------------------------------------------------------------------ one record

    def handle_record(self, record: SQSRecord | dict[str, Any]) -> str:
        """The batch processor's record handler. Returns how the record ended (``sent``,
        ``duplicate``, ``failed``); raises :class:`RetryLater` when it is back on the queue."""
        item = QueuedRecord.from_sqs(record)
        attempt = Attempt(message_id=item.sqs_message_id)
        try:
            return self._deliver(item, attempt)
        except Deferred as delay:
            return self.outcomes.put_back(item, attempt, delay.retry_after, delay.reason, delay.code)
        except GovernorDelay as delay:
            reason = f"the integration's {delay.reason} limit is reached"
            return self.outcomes.put_back(item, attempt, delay.retry_after, reason, "throttled")
        except MailbrokerError as exc:
            if isinstance(exc, SmtpFailure) and attempt.context:
                exc.bind(attempt.context)
            if self._duplicate_after_all(item, attempt):
                return "duplicate"
            if exc.retryable:
                return self.outcomes.retry(item, attempt, exc)
            return self.outcomes.give_up(item, attempt, exc)
        except Exception as exc:
            # Neither a classified failure nor AWS trouble (the stores turn botocore errors into
            # aws_unavailable): a bug. Retrying would repeat it for a day, so the message fails
            # now, with the traceback in the log, for an operator to re-drive once it is fixed.
            logger.exception(
                "unexpected failure delivering a message",
                extra={"message_id": attempt.message_id, "integration": attempt.integration_id},
            )
            if self._duplicate_after_all(item, attempt):
                return "duplicate"
            return self.outcomes.give_up(item, attempt, internal_error(exc))

    def _duplicate_after_all(self, item: QueuedRecord, attempt: Attempt) -> bool:
        """A failure before the claim: read the status record now (the claim would have), so the
        outcome is written on it; True when it says the message was already sent."""
        if attempt.loaded:
            return False
        try:
            self._load(attempt)
        except MailbrokerError:
            return False  # the outcome goes by the receive count, as for any store outage
        seen = attempt.seen
        if seen is not None and seen.is_live(self._clock()) and seen.status == "sent":
            return self._already_handled(item, attempt)
        return False

    def _parse(self, item: QueuedRecord, attempt: Attempt) -> OutgoingMessage:
        """The record's message, with its id; an invalid one is raised after its record is read,
        under the id and integration it declares."""
        try:
            message = parse_message(item.body)
        except InvalidMessage:
            attempt.message_id = item.declared("id") or item.sqs_message_id
            attempt.integration_id = item.declared("integration")
            self._load(attempt)
            raise
        attempt.message_id = message.id or item.sqs_message_id
        attempt.integration_id = message.integration
        if self._expected[message.integration] > 0:
            self._expected[message.integration] -= 1
        return message if message.id is not None else message.with_id(attempt.message_id)

    def _deliver(self, item: QueuedRecord, attempt: Attempt) -> str:
        message = self._parse(item, attempt)

        integration = self.integrations.get(message.integration)
        attempt.context = context_of(integration)
        self._check_sender(item, integration)
        message = with_sender_defaults(message, integration)
        message = check_allowed(message, integration)  # ``from`` as the integration spells it
        self._check_time_left(integration)
        mail_from, every = envelope(message)
        data = self._mime(
            self._tracked(message, integration), item, bcc_header=integration.transport != "smtp"
        )
        # Building takes time too: an id is claimed only with the time left to send it.
        self._check_time_left(integration)
        session = self.sessions.session_for(integration)
        if self.governor is not None:
            # Every recipient is counted against the daily cap: which ones are still outstanding
            # is known once the claim has answered the record (stricter on a retry, never looser).
            self._take_message(self.governor, integration, len(every))

        try:
            claimed = self._claim(item, attempt, integration.id)
        except BaseException:
            self._unused_place(integration.id)
            raise
        if not claimed:
            self._unused_place(integration.id)
            return "duplicate"
        # The claimed record keeps each recipient's outcome from earlier attempts.
        rcpts = outstanding(every, attempt.seen)
        if not rcpts:  # every recipient already has its outcome: record it
            self._unused_place(integration.id)
            return self._record_outcome(attempt, integration.id, every, accepted=[], refused={}, reply=None)

        started = time.monotonic()
        try:
            result = session.send(mail_from, rcpts, data, smtputf8=message.needs_smtputf8)
        except MailbrokerError as exc:
            # The session reconnects by itself after a dropped connection; a throttled server or
            # API is left alone by the rest of the batch.
            if exc.code in SLOWS_DOWN:
                self.sessions.hold_off(integration.id, exc)
            refusals = refusals_of(exc) if isinstance(exc, SmtpFailure) else None
            if refusals is None:
                raise
            # Every recipient of this attempt was refused: each keeps its own outcome.
            return self._record_outcome(
                attempt, integration.id, every, accepted=[], refused=refusals, reply=None
            )
        finally:
            integration_metric(
                "SmtpDurationMs", integration.id, (time.monotonic() - started) * 1000, "Milliseconds"
            )
        return self._record_outcome(
            attempt,
            integration.id,
            every,
            accepted=result.accepted,
            refused=_refused(result),
            reply=str(result.reply),
        )

    def _record_outcome(
        self,
        attempt: Attempt,
        integration_id: str,
        every: list[str],
        *,
        accepted: list[str],
        refused: dict[str, Any],
        reply: str | None,
    ) -> str:
        """Record each recipient's outcome. The message is ``sent`` once no recipient is left to
        retry and one has it; a recipient refused for now is retried alone (the raised failure
        puts the message back on the queue); when nobody has it and nobody can, it fails."""
        seen = attempt.seen
        outcome = settle(
            every, seen, accepted=accepted, refused=refused, reply=reply, context=attempt.context
        )
        final_reply = reply or (seen.reply if seen else None) or ""
        if outcome.pending or not outcome.delivered:
            attempt.seen = self.statuses.partly_sent(
                attempt.message_id, integration_id, seen, reply=final_reply, recipients=list(outcome.entries)
            )
            if accepted:
                integration_metric("MessagesPartlySent", integration_id, 1)
            raise outcome.first_error()
        self._record_sent(attempt, integration_id, final_reply, outcome)
        return "sent"

    def _claim(self, item: QueuedRecord, attempt: Attempt, integration_id: str) -> bool:
        """Claim the id (status ``sending``); False for a duplicate. Raises when the record says
        to wait or to stop."""
        self._write_sent_of(attempt.message_id)
        try:
            before, attempt.seen = self.statuses.claim(
                attempt.message_id, integration_id, holder=self.holder, lease_seconds=self.lease_seconds
            )
            attempt.before = before
            attempt.loaded = True
            return True
        except ClaimRefused as refused:
            attempt.seen = attempt.before = refused.current
            attempt.loaded = True
        if self._already_handled(item, attempt):
            return False
        # Neither new nor waiting, yet sendable (a re-driven failure, a record past its window):
        # claimed on the version just answered.
        try:
            attempt.seen = self.statuses.start_sending(
                attempt.message_id,
                integration_id,
                attempt.seen,
                holder=self.holder,
                lease_seconds=self.lease_seconds,
            )
        except StatusConflict:
            # Another copy of this id moved its record since: decide again from it.
            self._load(attempt)
            if self._already_handled(item, attempt):
                return False
            raise Deferred(1, "the status record changed while claiming it") from None
        return True

    def _check_sender(self, item: QueuedRecord, integration: Integration) -> None:
        """The body names the integration; only SQS's ``SenderId`` says who sent the message. An
        integration with ``allowed_callers`` takes messages from those principals only (and from
        the HTTP API, which checked the caller before queuing)."""
        sent_by_api = bool(self._api_sender_id) and item.sender_id.split(":", 1)[0] == self._api_sender_id
        if not sent_by_api:
            check_caller(Caller.from_sender_id(item.sender_id), integration)

    def _already_handled(self, item: QueuedRecord, attempt: Attempt) -> bool:
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
            integration_metric(
                "MessagesDuplicate", seen.integration or attempt.integration_id or "unknown", 1
            )
            return True
        if seen.status == "sending":
            if seen.lease_held(now):
                raise Deferred(seen.lease_until - now + 1, "another sender holds this id")
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

    def _take_message(self, governor: Governor, integration: Integration, recipients: int) -> None:
        """Take the message's place in the integration's pace (from the places the batch holds,
        or with the next records of the integration in one write) and count its recipients,
        waiting out a short delay."""
        limits = integration.effective_limits()
        while True:
            try:
                self._take_place(governor, integration.id, limits)
                try:
                    governor.count_recipients(integration.id, limits, recipients)
                except BaseException:
                    self._unused_place(integration.id)
                    raise
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

    def _take_place(self, governor: Governor, integration_id: str, limits: Limits) -> None:
        held = self._places.get(integration_id)
        if held is None or held.left <= 0:
            wanted = 1 + self._expected[integration_id]
            grant = governor.take_messages(integration_id, limits, wanted)
            held = self._places[integration_id] = _Places(grant, grant.granted)
        held.left -= 1

    def _unused_place(self, integration_id: str) -> None:
        """A place taken for a message that was not sent: kept for the batch's next one."""
        held = self._places.get(integration_id)
        if held is not None:
            held.left += 1

    def _time_for(self, wait: float, integration: Integration) -> bool:
        if self._remaining_ms is None:
            return True
        needed = max(self._min_remaining_ms, int(integration.smtp.timeout_seconds * 1000))
        return self._remaining_ms() - wait * 1000 >= needed

    def _check_time_left(self, integration: Integration) -> None:
        if self._remaining_ms is None:
            return
        needed = max(self._min_remaining_ms, int(integration.smtp.timeout_seconds * 1000))
        if self._remaining_ms() < needed:
            raise Deferred(1, "not enough time left in this invocation to send safely")

    def _tracked(self, message: OutgoingMessage, integration: Integration) -> OutgoingMessage:
        if self.tracker is not None:
            return self.tracker.apply(message, str(message.id), integration.tracking)
        wanted = message.tracking or integration.tracking
        if wanted.opens or wanted.clicks:
            logger.warning(
                "tracking asked for but not configured: sent untracked", extra={"message_id": message.id}
            )
        return message

    def _mime(self, message: OutgoingMessage, item: QueuedRecord, *, bcc_header: bool = False) -> bytes:
        # Date is when the message was queued, so every attempt sends the same bytes.
        when = datetime.fromtimestamp(item.sent_at, UTC) if item.sent_at else None
        # The HTTP transports have no envelope: their APIs read Bcc from the header and strip it.
        return build_mime(
            message, message_id_domain=message.sender.domain, now=when, bcc_header=bcc_header
        ).as_bytes()

    def _record_sent(self, attempt: Attempt, integration_id: str, reply: str, outcome: Recipients) -> None:
        """Note the ``sent`` record; the batch's are written together (:meth:`_write_sent`)."""
        refused = outcome.refused_for_good()
        try:
            self._unrecorded[attempt.message_id] = self.statuses.sent_record(
                attempt.message_id,
                integration_id,
                attempt.seen,
                reply=reply,
                refused=refused,
                recipients=list(outcome.entries),
            )
        except Exception:
            # A bug in the status store: still, nothing after the send may cause a second one.
            logger.exception(
                "message sent but its status could not be recorded",
                extra={"message_id": attempt.message_id, "integration": integration_id, "reply": reply},
            )
        if len(self._unrecorded) >= SENT_RECORDS_PER_WRITE:
            self._write_sent()
        logger.info(
            "message sent",
            extra={
                "message_id": attempt.message_id,
                "integration": integration_id,
                "reply": reply,
                "refused": len(refused),
            },
        )
        integration_metric("MessagesSent", integration_id, 1)
        if refused:
            integration_metric("RecipientsRefused", integration_id, len(refused))

    def _write_sent(self) -> None:
        """Write the ``sent`` records noted since the last time, in one request per 25. A record
        that cannot be written is logged: the server has the message, and deleting it from the
        queue is what prevents a resend."""
        records, self._unrecorded = list(self._unrecorded.values()), {}
        try:
            left = self.statuses.record_all(records)
        except MailbrokerError:
            left = records
        except Exception:
            logger.exception("sent messages' status records could not be written")
            left = records
        for record in left:
            logger.error(
                "message sent but its status could not be recorded",
                extra={"message_id": record.id, "integration": record.integration, "reply": record.reply},
            )

    def _write_sent_of(self, message_id: str) -> None:
        """Before a second copy of a message this batch sent reads or claims its record: write
        the batch's ``sent`` records, so the copy finds ``sent``."""
        if message_id in self._unrecorded:
            self._write_sent()

    def _load(self, attempt: Attempt) -> None:
        self._write_sent_of(attempt.message_id)
        attempt.seen = self.statuses.load(attempt.message_id)
        if not attempt.loaded:
            attempt.before = attempt.seen
        attempt.loaded = True


def _refused(result: SendResult) -> dict[str, Any]:
    refused = getattr(result, "refused", None) or {}
    if isinstance(refused, dict):
        return refused
    return {str(recipient): reply for recipient, reply in refused}
