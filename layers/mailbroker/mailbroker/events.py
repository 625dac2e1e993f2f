"""Delivery events: what an application hears about its mail and its integrations, on EventBridge.

The publisher function reads two DynamoDB streams (``NEW_AND_OLD_IMAGES``): the message table's,
whose ``msg#`` items are the status records, and the token table's, whose ``health#`` items are
the keeper's health records. Each change an application cares about becomes one event on the bus
``EVENT_BUS_NAME``, ``Source`` ``mailbroker``:

=============================  ==============================================================
DetailType                     the change
=============================  ==============================================================
``Message Sent``               a status record reaches ``sent``
``Message Retrying``           a status record reaches ``retrying``, or its attempt count grows
``Message Failed``             a status record reaches ``failed``
``Message Delivery Uncertain`` it reaches ``failed`` with ``delivery_uncertain``
``Message Opened``             a tracked message's open count grows
``Message Link Clicked``       a tracked message's click count grows (``url``: the link's)
``Integration Health Changed`` a health record's ``healthy`` flips (a first record counts as a
                               change from healthy)
=============================  ==============================================================

``Detail`` holds ``id``, ``integration``, ``status``, ``attempts``, ``at`` (ISO 8601) and, where
they apply, ``code``, ``hint``, ``reply``, ``accepted``, ``refused`` and ``url``, and for opens and
clicks ``machine`` (likely a scanner or an image proxy: flagged, never dropped). It is built
from named fields of the record only, so nothing else a record may hold (and never a credential
or a message body, which no record holds) can reach an event.

Delivery is at least once: a batch that fails is read again from the stream, so consumers
de-duplicate by (``id``, ``DetailType``, ``attempts``). For a health event ``id`` is the
integration id and ``attempts`` the health record's revision, which grows with every write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mailbroker.errors import AwsUnavailable, aws_failure

SOURCE = "mailbroker"
MESSAGE_SENT = "Message Sent"
MESSAGE_FAILED = "Message Failed"
MESSAGE_RETRYING = "Message Retrying"
MESSAGE_UNCERTAIN = "Message Delivery Uncertain"
MESSAGE_OPENED = "Message Opened"
MESSAGE_LINK_CLICKED = "Message Link Clicked"
HEALTH_CHANGED = "Integration Health Changed"
DETAIL_TYPES = (
    MESSAGE_SENT,
    MESSAGE_FAILED,
    MESSAGE_RETRYING,
    MESSAGE_UNCERTAIN,
    MESSAGE_OPENED,
    MESSAGE_LINK_CLICKED,
    HEALTH_CHANGED,
)
MESSAGE_PREFIX = "msg#"
HEALTH_PREFIX = "health#"
# PutEvents takes at most 10 entries per call.
PUT_EVENTS_LIMIT = 10


@dataclass(frozen=True)
class DeliveryEvent:
    detail_type: str
    detail: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, int]:
        """What a consumer de-duplicates by."""
        return (str(self.detail["id"]), self.detail_type, int(self.detail["attempts"]))

    def entry(self, bus: str) -> dict[str, Any]:
        """The PutEvents entry."""
        return {
            "Source": SOURCE,
            "DetailType": self.detail_type,
            "Detail": json.dumps(self.detail, ensure_ascii=False, sort_keys=True),
            "EventBusName": bus,
        }


# ------------------------------------------------------------------------ stream records → events


def events_for_change(record: Mapping[str, Any]) -> list[DeliveryEvent]:
    """The events one DynamoDB stream record (Lambda's event shape) announces; none for items
    that are neither status nor health records, for deletions, and for changes nobody waits for
    (``queued``, ``sending``)."""
    change = record.get("dynamodb") or {}
    key = ((change.get("Keys") or {}).get("pk") or {}).get("S", "")
    new = _plain(change.get("NewImage"))
    old = _plain(change.get("OldImage"))
    if not new:
        return []
    if key.startswith(MESSAGE_PREFIX):
        return message_events(old, new)
    if key.startswith(HEALTH_PREFIX):
        return health_events(old, new)
    return []


def message_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[DeliveryEvent]:
    return status_events(old, new) + engagement_events(old or {}, new)


def status_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[DeliveryEvent]:
    detail_type = _status_event(new)
    if detail_type is None:
        return []
    unchanged = (
        old is not None
        and _status_event(old) == detail_type
        and _int(old.get("attempts")) == _int(new.get("attempts"))
    )
    if unchanged:
        return []
    return [DeliveryEvent(detail_type, _message_detail(new))]


def engagement_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[DeliveryEvent]:
    """An open or a click counted on a tracked message's record (``messages/engagement.py``).
    ``attempts`` is the open's (or the message's click's) ordinal, so each one is its own event;
    ``machine`` says whether it looked like a scanner or an image proxy."""
    found = []
    for count, machine, at, detail_type, status in (
        ("opens", "machine_opens", "last_opened_at", MESSAGE_OPENED, "opened"),
        ("clicks", "machine_clicks", "last_clicked_at", MESSAGE_LINK_CLICKED, "clicked"),
    ):
        if _int(new.get(count)) <= _int(old.get(count)):
            continue
        detail: dict[str, Any] = {
            "id": str(new.get("id")),
            "integration": new.get("integration"),
            "status": status,
            "attempts": _int(new.get(count)),
            "at": _iso(_number(new.get(at))),
            "machine": _int(new.get(machine)) > _int(old.get(machine)),
        }
        if detail_type == MESSAGE_LINK_CLICKED:
            detail.update(_present(url=new.get(f"link#{_int(new.get('last_click_link'))}")))
        found.append(DeliveryEvent(detail_type, detail))
    return found


def health_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[DeliveryEvent]:
    doc = _json(new.get("doc"))
    if not isinstance(doc, dict):
        return []
    # As for the keeper's alerts, a first record counts as a change from healthy: an integration
    # broken from the start is announced, a healthy one is not.
    was_healthy = bool(old.get("healthy")) if old is not None else True
    healthy = bool(doc.get("healthy"))
    if healthy == was_healthy:
        return []
    integration = str(doc.get("integration") or "")
    detail: dict[str, Any] = {
        "id": integration,
        "integration": integration,
        "status": "healthy" if healthy else "unhealthy",
        "attempts": _int(new.get("version")),
        "at": doc.get("checked_at") or _iso(_number(new.get("checked_at"))),
    }
    error = doc.get("last_error")
    if not healthy and isinstance(error, dict):
        detail.update(_present(code=error.get("code"), hint=error.get("hint")))
    return [DeliveryEvent(HEALTH_CHANGED, detail)]


def _status_event(image: Mapping[str, Any]) -> str | None:
    status = image.get("status")
    if status == "sent":
        return MESSAGE_SENT
    if status == "retrying":
        return MESSAGE_RETRYING
    if status == "failed":
        error = _json(image.get("last_error")) or {}
        uncertain = isinstance(error, dict) and error.get("code") == "delivery_uncertain"
        return MESSAGE_UNCERTAIN if uncertain else MESSAGE_FAILED
    return None


def _message_detail(image: Mapping[str, Any]) -> dict[str, Any]:
    status = str(image.get("status"))
    detail: dict[str, Any] = {
        "id": str(image.get("id")),
        "integration": image.get("integration"),
        "status": status,
        "attempts": _int(image.get("attempts")),
        "at": _iso(_number(image.get("updated_at"))),
    }
    error = _json(image.get("last_error"))
    if status != "sent" and isinstance(error, dict):
        detail.update(_present(code=error.get("code"), hint=error.get("hint"), reply=error.get("reply")))
    if status == "sent":
        detail.update(_present(reply=image.get("reply")))
    detail.update(_recipients(image))
    return detail


def _recipients(image: Mapping[str, Any]) -> dict[str, Any]:
    """``accepted``: the addresses whose outcome in the record's ``recipients`` is ``delivered``
    (so far, for a message still retrying others); ``refused``: the record's permanent refusals,
    as ``{"recipient", "reply"}``."""
    found: dict[str, Any] = {}
    outcomes = _json(image.get("recipients"))
    if isinstance(outcomes, list):
        accepted = [
            str(entry["recipient"])
            for entry in outcomes
            if isinstance(entry, dict) and entry.get("status") == "delivered" and entry.get("recipient")
        ]
        if accepted:
            found["accepted"] = accepted
    refused = _json(image.get("refused"))
    if isinstance(refused, list) and refused:
        found["refused"] = refused
    return found


# ------------------------------------------------------------------------ publishing


class EventPublisher:
    """Puts events on one bus. A failed entry raises, so the stream record that announced it is
    read again (at least once); nothing is published without a bus name."""

    def __init__(self, events_client: Any, bus: str) -> None:
        self._events = events_client
        self.bus = bus

    def publish(self, events: list[DeliveryEvent]) -> int:
        for start in range(0, len(events), PUT_EVENTS_LIMIT):
            chunk = events[start : start + PUT_EVENTS_LIMIT]
            try:
                answer = self._events.put_events(Entries=[event.entry(self.bus) for event in chunk])
            except Exception as exc:
                raise aws_failure(exc, "EventBridge PutEvents") from exc
            if answer.get("FailedEntryCount"):
                codes = sorted(
                    {e.get("ErrorCode", "unknown") for e in answer.get("Entries", []) if e.get("ErrorCode")}
                )
                raise AwsUnavailable(
                    f"EventBridge PutEvents failed for {answer['FailedEntryCount']} event(s): "
                    + ", ".join(codes)
                )
        return len(events)


# ------------------------------------------------------------------------ helpers


def _plain(image: Any) -> dict[str, Any] | None:
    """A stream image (DynamoDB JSON) as plain values: strings, numbers as float, booleans."""
    if not isinstance(image, Mapping):
        return None
    return {name: _value(typed) for name, typed in image.items()}


def _value(typed: Any) -> Any:
    if not isinstance(typed, Mapping) or len(typed) != 1:
        return None
    ((kind, value),) = typed.items()
    if kind == "N":
        return float(value)
    if kind in ("S", "BOOL"):
        return value
    if kind == "L":
        return [_value(item) for item in value]
    if kind == "M":
        return {k: _value(v) for k, v in value.items()}
    return None


def _json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _present(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value not in (None, "")}
