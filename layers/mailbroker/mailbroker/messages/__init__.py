"""Messages: the queued JSON validated (``models``) and turned into MIME (``mime``).

Queuing is ``queue``; each id's status record ``status``. The sender's side: ``delivery`` (the
flow of one record), ``received`` (the SQS record, put back, retried or dead-lettered),
``sessions`` (one SMTP session per integration per batch) and ``retry`` (the schedule).
"""

from mailbroker.messages.mime import build_mime, envelope, message_id_for
from mailbroker.messages.models import (
    Attachment,
    EmailAddress,
    OutgoingMessage,
    check_allowed,
    parse_message,
    with_sender_defaults,
)

__all__ = [
    "Attachment",
    "EmailAddress",
    "OutgoingMessage",
    "build_mime",
    "check_allowed",
    "envelope",
    "message_id_for",
    "parse_message",
    "with_sender_defaults",
]
