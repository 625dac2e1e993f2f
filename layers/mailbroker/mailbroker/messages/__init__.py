"""Messages: the queued JSON validated (``models``) and turned into MIME (``mime``).

Queuing is ``queue``; each id's status record ``status``. The sender's side: ``delivery`` (the
flow of one record), ``received`` (the SQS record, put back, retried or dead-lettered),
``sessions`` (one SMTP session per integration per batch) and ``retry`` (the schedule).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailbroker.messages.mime import build_mime, envelope, message_id_for
    from mailbroker.messages.models import (
        Attachment,
        EmailAddress,
        OutgoingMessage,
        check_allowed,
        parse_message,
        with_sender_defaults,
    )

# Where each name below lives. They are imported on first use, so importing one of the package's
# modules (the tracking function's ``tracking`` and ``engagement``) does not load the pydantic
# message models and the MIME builder with it.
_HOMES = {
    "build_mime": "mime",
    "envelope": "mime",
    "message_id_for": "mime",
    "Attachment": "models",
    "EmailAddress": "models",
    "OutgoingMessage": "models",
    "check_allowed": "models",
    "parse_message": "models",
    "with_sender_defaults": "models",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
