"""Each recipient's own outcome, across the attempts of one message.

An SMTP server answers every RCPT on its own: it may take the message for two recipients and
refuse the third for now (``452 4.5.3 Too many recipients``, a greylisting ``450``) or for good
(``550 5.1.1``). What the recipient's refusal means is classified like any reply
(``errors.classify_smtp_reply`` at the ``rcpt`` stage); a retryable one leaves that recipient
``retrying`` and only it is tried again, on the message's retry schedule, until delivered or
expired. Whoever was ``delivered`` is never sent the message again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mailbroker.errors import SmtpFailure, SmtpReply, classify_smtp_reply, scrub
from mailbroker.messages.status import MessageRecord

DELIVERED, RETRYING, FAILED = "delivered", "retrying", "failed"


def outstanding(every: list[str], seen: MessageRecord | None) -> list[str]:
    """The recipients still to be sent to: not delivered, and not failed for good in this round
    of attempts (a re-drive after a failure tries the failed ones again)."""
    if seen is None:
        return list(every)
    done = seen.recipients_in(DELIVERED)
    if seen.status != "failed":
        done |= seen.recipients_in(FAILED)
    return [rcpt for rcpt in every if rcpt.casefold() not in done]


def refusals_of(failure: SmtpFailure) -> dict[str, SmtpReply] | None:
    """The replies of a transaction that failed because every recipient was refused (their
    replies are in the failure's details), or None for any other failure."""
    if failure.stage != "rcpt" or not failure.details:
        return None
    refusals: dict[str, SmtpReply] = {}
    for detail in failure.details:
        recipient, said = str(detail.get("recipient") or ""), str(detail.get("reply") or "")
        code, _, text = said.partition(" ")
        if not recipient or not code.isdigit():
            return None
        refusals[recipient] = SmtpReply.parse(int(code), text)
    return refusals


@dataclass(frozen=True)
class Recipients:
    """Every recipient's outcome after an attempt, in envelope order."""

    entries: tuple[dict[str, Any], ...]
    errors: tuple[SmtpFailure, ...]  # the classified refusals of this attempt, pending first

    def in_state(self, state: str) -> list[dict[str, Any]]:
        return [entry for entry in self.entries if entry["status"] == state]

    @property
    def pending(self) -> list[dict[str, Any]]:
        return self.in_state(RETRYING)

    @property
    def delivered(self) -> list[dict[str, Any]]:
        return self.in_state(DELIVERED)

    def refused_for_good(self) -> list[dict[str, str]]:
        return [{"recipient": e["recipient"], "reply": e.get("reply", "")} for e in self.in_state(FAILED)]

    def first_error(self) -> SmtpFailure:
        """The failure that stands for this attempt: a pending recipient's refusal if any (the
        message is retried for it), else the first refusal; the details name every recipient
        not delivered."""
        if not self.errors:  # nobody has it and nobody was tried now: every refusal was final
            return SmtpFailure("rcpt: every recipient was refused", code="recipient_rejected", stage="rcpt")
        failure = self.errors[0]
        others = [e for e in self.entries if e["status"] != DELIVERED]
        failure.details = [{"recipient": e["recipient"], "reply": e.get("reply", "")} for e in others]
        if self.pending:
            failure.message = (
                f"rcpt: {len(self.pending)} of {len(self.entries)} recipient(s) refused for now and "
                f"retried on their own: {failure.message.removeprefix('rcpt: ')}"
            )
        return failure


def settle(
    every: Iterable[str],
    seen: MessageRecord | None,
    *,
    accepted: Iterable[str],
    refused: dict[str, SmtpReply],
    reply: str | None,
    context: dict[str, str] | None,
) -> Recipients:
    """Each recipient's outcome: what this attempt's transaction said for those it carried, what
    the record already knew for the others."""
    known = {str(r["recipient"]).casefold(): r for r in (seen.recipients if seen else ())}
    taken = {rcpt.casefold() for rcpt in accepted}
    said = {rcpt.casefold(): (rcpt, answer) for rcpt, answer in refused.items()}
    entries: list[dict[str, Any]] = []
    pending_errors: list[SmtpFailure] = []
    final_errors: list[SmtpFailure] = []
    for rcpt in every:
        key = rcpt.casefold()
        if key in taken:
            entries.append({"recipient": rcpt, "status": DELIVERED, "reply": reply or ""})
        elif key in said:
            failure = classify_smtp_reply(said[key][1], "rcpt", context)
            (pending_errors if failure.retryable else final_errors).append(failure)
            entries.append(
                {
                    "recipient": rcpt,
                    "status": RETRYING if failure.retryable else FAILED,
                    "reply": scrub(str(said[key][1])),
                    "code": failure.code,
                    "hint": failure.hint,
                }
            )
        elif key in known:
            entries.append(known[key])
    return Recipients(tuple(entries), tuple(pending_errors + final_errors))
