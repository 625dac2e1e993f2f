"""One SMTP mail transaction on an open, authenticated ``smtplib.SMTP`` connection.

With PIPELINING (RFC 2920) the client writes ``[RSET] MAIL RCPT... DATA`` at once and reads the
replies in order: one round trip, then the body and the final reply. With CHUNKING (RFC 3030)
``BDAT <n> LAST`` and the body go in that same write, so a whole message costs one round trip.
Without PIPELINING every command waits for its reply. Both paths judge the replies the same way:

- a refused MAIL fails the transaction (the pipelined RCPT and DATA replies are then 503s);
- each RCPT is accepted (250/251) or refused with its reply; when every recipient is refused,
  no body is sent (a 354 to a pipelined DATA is answered with a lone '.') and the transaction
  fails with the first temporary refusal if there is one, else the first refusal;
- the final reply after the body decides the message.

Connection loss is reported as :class:`ConnectionLost` with ``body_sent``: once the complete body
has been written, the server may have taken the message, and the caller must not resend it.
"""

from __future__ import annotations

import re
import select
import smtplib
import ssl
from dataclasses import dataclass, field

from mailbroker.errors import SmtpFailure, SmtpReply, classify_smtp_reply

_LEADING_DOT = re.compile(rb"(?m)^\.")


class ConnectionLost(Exception):
    """The connection failed at ``stage``. ``body_sent``: the whole message body had been written;
    ``before_mail``: no reply to MAIL was received (nothing of this transaction was accepted)."""

    def __init__(self, stage: str, cause: BaseException, *, body_sent: bool, before_mail: bool) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}")
        self.stage = stage
        self.cause = cause
        self.body_sent = body_sent
        self.before_mail = before_mail


@dataclass
class Transaction:
    mail_from: str
    rcpts: list[str]
    data: bytes  # canonical CRLF message, not dot-stuffed
    mail_params: list[str] = field(default_factory=list)
    reset: bool = False  # RSET first: the connection carried an earlier transaction
    utf8: bool = False  # SMTPUTF8: commands are UTF-8


@dataclass
class Outcome:
    reply: SmtpReply
    accepted: list[str]
    refused: dict[str, SmtpReply]
    round_trips: int


@dataclass
class _Step:
    stage: str
    command: bytes
    rcpt: str | None = None
    reply: SmtpReply | None = None


def data_body(data: bytes) -> bytes:
    """The DATA payload: dot-stuffed (RFC 5321 §4.5.2) and terminated by CRLF.CRLF."""
    stuffed = _LEADING_DOT.sub(b"..", data)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def peer_has_spoken(smtp: smtplib.SMTP) -> bool:
    """True when the server sent something (a 421, a TLS close) or closed while it should be
    waiting for us: the connection cannot carry a transaction."""
    sock = smtp.sock
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class _Wire:
    def __init__(self, smtp: smtplib.SMTP) -> None:
        self.smtp = smtp
        self.round_trips = 0
        self.body_sent = False
        self.mail_replied = False

    def write(self, payload: bytes, stage: str) -> None:
        try:
            self.smtp.send(payload)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise self.lost(stage, exc) from exc
        self.round_trips += 1

    def read(self, stage: str) -> SmtpReply:
        try:
            code, text = self.smtp.getreply()
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException, OSError) as exc:
            raise self.lost(stage, exc) from exc
        if code < 200:
            self.smtp.close()
            raise self.lost(stage, smtplib.SMTPResponseException(code, b"unreadable reply"))
        reply = SmtpReply.parse(code, text)
        if stage == "mail":
            self.mail_replied = True
        if code == 421:  # the server is closing the connection
            self.smtp.close()
            if stage == "rset":
                raise self.lost(stage, smtplib.SMTPServerDisconnected(str(reply)))
        return reply

    def lost(self, stage: str, exc: BaseException) -> ConnectionLost:
        self.smtp.close()
        return ConnectionLost(stage, exc, body_sent=self.body_sent, before_mail=not self.mail_replied)


def run_transaction(smtp: smtplib.SMTP, tx: Transaction, *, pipelining: bool, chunking: bool) -> Outcome:
    """Send one message. Returns the outcome, or raises ``SmtpFailure`` (classified) or
    ``ConnectionLost``."""
    steps, final = _commands(tx, chunking=chunking)
    wire = _Wire(smtp)
    if pipelining:
        _send_envelope_pipelined(wire, steps, final, chunking=chunking)
    else:
        _send_envelope_in_turn(wire, steps, final, chunking=chunking)
    reply = final.reply
    assert reply is not None
    if not chunking:
        reply = _send_data_body(smtp, wire, tx, reply)
    if not _positive(reply):
        raise classify_smtp_reply(reply, "body")
    rcpt_steps = [(s.rcpt, s.reply) for s in steps if s.rcpt is not None and s.reply is not None]
    return Outcome(
        reply=reply,
        accepted=[rcpt for rcpt, r in rcpt_steps if _positive(r)],
        refused={rcpt: r for rcpt, r in rcpt_steps if not _positive(r)},
        round_trips=wire.round_trips,
    )


def _commands(tx: Transaction, *, chunking: bool) -> tuple[list[_Step], _Step]:
    """The envelope's commands (RSET, MAIL, one RCPT per recipient) and the final one: DATA, or
    with CHUNKING one BDAT LAST carrying the whole body."""
    encoding = "utf-8" if tx.utf8 else "ascii"
    params = "".join(f" {p}" for p in tx.mail_params)
    steps = [_Step("rset", b"RSET\r\n")] if tx.reset else []
    steps.append(_Step("mail", f"MAIL FROM:<{tx.mail_from}>{params}\r\n".encode(encoding)))
    steps += [_Step("rcpt", f"RCPT TO:<{rcpt}>\r\n".encode(encoding), rcpt) for rcpt in tx.rcpts]
    final = (
        _Step("body", f"BDAT {len(tx.data)} LAST\r\n".encode() + tx.data)
        if chunking
        else _Step("data", b"DATA\r\n")
    )
    return steps, final


def _send_envelope_pipelined(wire: _Wire, steps: list[_Step], final: _Step, *, chunking: bool) -> None:
    """Every command in one write (RFC 2920), then every reply in order."""
    wire.write(b"".join(s.command for s in (*steps, final)), final.stage if chunking else steps[0].stage)
    wire.body_sent = chunking
    for step in (*steps, final):
        step.reply = wire.read(step.stage)
        if step.reply.code == 421:
            raise classify_smtp_reply(step.reply, step.stage)
    failure = _envelope_failure(steps)
    if failure is not None:
        if final.reply is not None and final.reply.code == 354:
            # DATA was accepted without a recipient: end it with an empty message.
            wire.write(b".\r\n", "data")
            wire.read("data")
        raise failure


def _send_envelope_in_turn(wire: _Wire, steps: list[_Step], final: _Step, *, chunking: bool) -> None:
    """One command, one reply; the final command only once a recipient was accepted."""
    for step in steps:
        wire.write(step.command, step.stage)
        step.reply = wire.read(step.stage)
        if step.reply.code == 421 or (step.stage != "rcpt" and not _positive(step.reply)):
            raise classify_smtp_reply(step.reply, step.stage)
    failure = _envelope_failure(steps)
    if failure is not None:
        raise failure
    wire.write(final.command, final.stage)
    wire.body_sent = chunking
    final.reply = wire.read(final.stage)


def _send_data_body(smtp: smtplib.SMTP, wire: _Wire, tx: Transaction, reply: SmtpReply) -> SmtpReply:
    """After DATA's 354: the dot-stuffed body and its final reply."""
    if reply.code != 354:
        raise classify_smtp_reply(reply, "data")
    if peer_has_spoken(smtp):
        raise wire.lost("data", smtplib.SMTPServerDisconnected("the server spoke or closed before the body"))
    wire.write(data_body(tx.data), "body")
    wire.body_sent = True
    return wire.read("body")


def _positive(reply: SmtpReply) -> bool:
    return 200 <= reply.code < 300


def _envelope_failure(steps: list[_Step]) -> SmtpFailure | None:
    """The failure when RSET or MAIL was refused, or every RCPT was."""
    for step in steps:
        if step.stage in ("rset", "mail") and step.reply is not None and not _positive(step.reply):
            return classify_smtp_reply(step.reply, step.stage)
    rcpts = [s for s in steps if s.stage == "rcpt"]
    if any(s.reply is not None and _positive(s.reply) for s in rcpts):
        return None
    return _all_refused(rcpts)


def _all_refused(rcpts: list[_Step]) -> SmtpFailure:
    replies = [s.reply for s in rcpts if s.reply is not None]
    temporary = [r for r in replies if 400 <= r.code < 500]
    failure = classify_smtp_reply((temporary or replies)[0], "rcpt")
    failure.details = [{"recipient": s.rcpt, "reply": str(s.reply)} for s in rcpts]
    return failure
