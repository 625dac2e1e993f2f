"""An :class:`OutgoingMessage` as an RFC 5322 / MIME message, built with the standard ``email``
package, and its SMTP envelope.

The output is a function of the message and ``now``: the Message-ID and every multipart boundary
are derived from the message ``id``, so a retried send carries the same Message-ID (receivers
de-duplicate on it) and tests can compare bytes. Text parts are 7bit when they are short-lined
ASCII and quoted-printable otherwise, attachments base64: the body never needs 8BITMIME. Only a
message with a non-ASCII local part is built with UTF-8 headers (``policy.SMTPUTF8``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime

from mailbroker.errors import InvalidMessage
from mailbroker.messages.address_header import address_header
from mailbroker.messages.models import OutgoingMessage

_HOST = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_TEXT_LINE_LIMIT = 78


def message_id_for(message_id: str, domain: str) -> str:
    """The Message-ID header of the message whose idempotency key is ``message_id``."""
    if not _HOST.fullmatch(domain):
        raise ValueError("message_id_domain must be a host name")
    return f"<{hashlib.sha256(message_id.encode('utf-8')).hexdigest()[:32]}@{domain}>"


def build_mime(
    message: OutgoingMessage,
    *,
    message_id_domain: str,
    now: dt.datetime | None = None,
    bcc_header: bool = False,
) -> EmailMessage:
    """The message as MIME: text and html as multipart/alternative, attachments in
    multipart/mixed. Serialise with ``as_bytes()`` (CRLF line endings, ready for SMTP).

    For SMTP, Bcc recipients are only in the envelope. The HTTP APIs (Graph's MIME sendMail,
    Gmail's messages.send) have no envelope: they read the recipients from To, Cc and Bcc and
    remove the Bcc header from what they deliver, so ``bcc_header=True`` writes it for them."""
    policy = email_policy.SMTPUTF8 if message.needs_smtputf8 else email_policy.SMTP
    seed = message.id or uuid.uuid4().hex
    when = now or dt.datetime.now(dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)

    root = EmailMessage(policy=policy)
    # Address headers are folded by address_header.py in one pass (set_raw: stored as they are).
    # For SMTP, Bcc is only in the envelope; the HTTP transports read it from the header.
    for name, addresses in (
        ("From", [message.sender]),
        ("To", message.to),
        ("Cc", message.cc),
        ("Bcc", message.bcc if bcc_header else []),
        ("Reply-To", message.reply_to),
    ):
        if addresses:
            root.set_raw(name, address_header(name, addresses, utf8=policy.utf8))
    root["Subject"] = message.subject
    root["Date"] = format_datetime(when)
    root["Message-ID"] = message_id_for(seed, message_id_domain)
    for name, value in message.headers.items():
        root[name] = value
    root["MIME-Version"] = "1.0"

    bodies = [(subtype, text) for subtype, text in (("plain", message.text), ("html", message.html)) if text]
    if message.attachments:
        root.make_mixed()
        body = MIMEPart(policy=policy)
        _fill_body(body, bodies)
        root.attach(body)  # type: ignore[arg-type]  # typeshed wants EmailMessage; MIMEPart is its base
        for attachment in message.attachments:
            part = MIMEPart(policy=policy)
            maintype, subtype = attachment.mime_type.split("/", 1)
            part.set_content(
                attachment.content,
                maintype=maintype,
                subtype=subtype,
                disposition="attachment",
                filename=attachment.filename,
            )
            root.attach(part)  # type: ignore[arg-type]
    else:
        _fill_body(root, bodies)
    _set_boundaries(root, seed)
    _refuse_broken_part_headers(root)
    return root


def _refuse_broken_part_headers(root: EmailMessage) -> None:
    """No MIME header of any part holds a line break once the email package has read its
    parameters (it decodes RFC 2047 words inside them, and ``as_bytes`` writes headers without
    ``verify_generated_headers``): such a header could add part headers or close the multipart
    early. ``messages/models.py`` refuses the known way in; this is the backstop."""
    for part in root.walk():
        for name, value in part.raw_items():
            if name.lower().startswith("content-") and ("\r" in str(value) or "\n" in str(value)):
                raise InvalidMessage(
                    "invalid message: a MIME header would carry a line break",
                    details=[{"field": "attachments", "problem": "a file name would break a MIME header"}],
                )


def envelope(message: OutgoingMessage) -> tuple[str, list[str]]:
    """``(MAIL FROM, [RCPT TO, ...])``: to, cc and bcc once each, in that order."""
    seen: set[str] = set()
    rcpts = []
    for address in message.recipients:
        if address.email.lower() not in seen:
            seen.add(address.email.lower())
            rcpts.append(address.email)
    return message.sender.email, rcpts


def _fill_body(part: MIMEPart, bodies: list[tuple[str, str]]) -> None:
    if len(bodies) == 1:
        _set_text(part, *bodies[0])
        return
    part.make_alternative()
    for subtype, text in bodies:
        child = MIMEPart(policy=part.policy)
        _set_text(child, subtype, text)
        part.attach(child)


def _set_text(part: MIMEPart, subtype: str, text: str) -> None:
    short_ascii = text.isascii() and all(len(line) <= _TEXT_LINE_LIMIT for line in text.splitlines())
    part.set_content(
        text, subtype=subtype, charset="utf-8", cte="7bit" if short_ascii else "quoted-printable"
    )


def _set_boundaries(root: EmailMessage, seed: str) -> None:
    """Boundaries from the message id. They start with '=_', which quoted-printable and base64
    never produce; 7bit parts are searched so a boundary never occurs in content."""
    multiparts = [p for p in root.walk() if p.is_multipart()]
    plain = [
        p.get_payload()
        for p in root.walk()
        if not p.is_multipart() and p.get("Content-Transfer-Encoding") == "7bit"
    ]
    for index, part in enumerate(multiparts):
        attempt = 0
        while True:
            digest = hashlib.sha256(f"{seed}\x00{index}\x00{attempt}".encode()).hexdigest()
            boundary = f"=_{digest[:30]}"
            if not any(boundary in text for text in plain):
                break
            attempt += 1
        part.set_boundary(boundary)
