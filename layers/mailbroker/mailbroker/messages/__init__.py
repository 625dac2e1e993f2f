"""Messages: the queued JSON validated (``models``) and turned into MIME (``mime``)."""

from mailbroker.messages.mime import build_mime, envelope, message_id_for
from mailbroker.messages.models import (
    Attachment,
    EmailAddress,
    OutgoingMessage,
    check_allowed,
    parse_message,
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
]
