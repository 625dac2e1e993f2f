"""The tracking function: the two unauthenticated routes of the HTTP API (payload v2).

``GET /v1/t/o/{token}`` answers the 1x1 image and counts an open; ``GET /v1/t/c/{token}``
answers ``302`` to the URL signed into the token and counts a click. A token that does not verify
answers ``404`` (``not_found``), whatever it claims. Counting never stands between a reader and
the link: when the record cannot be updated the answer is the same, and the failure is logged.
"""

from __future__ import annotations

import base64
import json
import time
from functools import lru_cache
from typing import Any

from mailbroker import runtime
from mailbroker.errors import MailbrokerError, NotFound
from mailbroker.messages.engagement import EngagementStore, Hit
from mailbroker.messages.tracking import CLICK, OPEN, PIXEL, TrackedLink, TrackingSigner, read_token
from mailbroker.observability import logger, metrics
from mailbroker.settings import TrackingSettings, get_settings

ROUTES = {"GET /v1/t/o/{token}": OPEN, "GET /v1/t/c/{token}": CLICK}
# Nothing about a tracked hit may be cached or passed on: each open counts, and the tracked URL
# is not the reader's business to leak onwards.
_NO_STORE = {"Cache-Control": "no-store, private", "Referrer-Policy": "no-referrer"}


@lru_cache(maxsize=1)
def _signer() -> TrackingSigner:
    return runtime.tracking_signer(get_settings(TrackingSettings))


@lru_cache(maxsize=1)
def _store() -> EngagementStore:
    return runtime.engagement_store(get_settings(TrackingSettings))


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    get_settings(TrackingSettings)  # a missing variable fails here, named, before any call
    kind = ROUTES.get(str(event.get("routeKey")))
    token = str((event.get("pathParameters") or {}).get("token") or "")
    try:
        link = read_token(_signer(), token, kind) if kind else None
    except MailbrokerError as exc:
        logger.warning("tracking token not verified", extra={"code": exc.code})
        return _error(exc)
    if link is None:
        metrics.add_metric(name="TrackingTokensRefused", unit="Count", value=1)
        return _error(NotFound("no such tracking link: it was altered, or this mailbroker did not issue it"))
    _count(link, _hit(event))
    if link.kind == OPEN:
        return {
            "statusCode": 200,
            "headers": {"Content-Type": "image/gif", **_NO_STORE},
            "body": base64.b64encode(PIXEL).decode("ascii"),
            "isBase64Encoded": True,
        }
    return {"statusCode": 302, "headers": {"Location": str(link.url), **_NO_STORE}, "body": ""}


def _hit(event: dict[str, Any]) -> Hit:
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    epoch_ms = (event.get("requestContext") or {}).get("timeEpoch")
    at = epoch_ms / 1000 if isinstance(epoch_ms, int | float) else time.time()
    return Hit(user_agent=headers.get("user-agent", ""), at=at)


def _count(link: TrackedLink, hit: Hit) -> None:
    try:
        if link.kind == OPEN:
            counted = _store().record_open(link.message_id, hit)
        else:
            counted = _store().record_click(link.message_id, int(link.link or 0), str(link.url), hit)
    except MailbrokerError as exc:
        logger.warning("tracked hit not counted", extra={"message_id": link.message_id, "code": exc.code})
        return
    metrics.add_metric(name="TrackedOpens" if link.kind == OPEN else "TrackedClicks", unit="Count", value=1)
    if not counted:
        logger.info("tracked hit for a message without a record", extra={"message_id": link.message_id})


def _error(error: MailbrokerError) -> dict[str, Any]:
    return {
        "statusCode": error.kind.http_status,
        "headers": {"Content-Type": "application/json", **_NO_STORE},
        "body": json.dumps({"error": error.to_dict()}),
    }


def reset() -> None:
    _signer.cache_clear()
    _store.cache_clear()
