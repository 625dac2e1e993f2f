"""``POST /v1/messages`` and ``GET /v1/messages/{id}``."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router

from mailbroker import runtime
from mailbroker.callers import Caller
from mailbroker.errors import InvalidMessage, NotFound
from mailbroker.messages.status import MessageStatusStore
from mailbroker.settings import TokenBrokerSettings, get_settings

router = Router()


def _statuses() -> MessageStatusStore:
    return runtime.status_store(get_settings(TokenBrokerSettings))


@router.post("/v1/messages")
def post_message() -> Response[dict[str, Any]]:
    """Validate and queue a message: 202 ``{"id", "status"}``, or 400 with every field error.
    A second post of an id already queued, sending or sent answers its current status."""
    body = router.current_event.decoded_body
    if not body:
        raise InvalidMessage(
            "the request has no body", details=[{"field": "(root)", "problem": "a message JSON is required"}]
        )
    queue = runtime.message_queue(get_settings(TokenBrokerSettings), _statuses(), runtime.integration_store())
    answer = queue.enqueue(body, caller=Caller.from_api_event(router.current_event.raw_event))
    return Response(status_code=202, content_type=content_types.APPLICATION_JSON, body=answer)


@router.get("/v1/messages/<message_id>")
def get_message(message_id: str) -> Response[dict[str, Any]]:
    """The message's status record, or ``not_found`` (404)."""
    message_id = unquote(message_id)
    record = _statuses().get(message_id)
    if record is None:
        raise NotFound(
            "no status record for this message id",
            hint="Records are kept for the idempotency window (IDEMPOTENCY_HOURS) after the last "
            "change; check the id, or the dead-letter queue for an invalid message.",
        )
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=record.to_public())
