"""Putting a message on the send queue (``POST /v1/messages``).

A message is validated before it is queued (schema, then the integration's senders and usage),
so a caller learns about every problem at once instead of from the dead-letter queue. Its status
record is written ``queued`` with a conditional write first: a second post of an id that is
already queued, sending, retrying or sent answers the current status and queues nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mailbroker.callers import Caller
from mailbroker.errors import AwsUnavailable, InvalidMessage, MailbrokerError, aws_error_code
from mailbroker.messages.models import check_allowed, parse_message, with_sender_defaults
from mailbroker.messages.status import IN_FLIGHT, MessageStatusStore, StatusConflict, error_record
from mailbroker.observability import logger

if TYPE_CHECKING:
    from mailbroker.integrations import Integration
    from mailbroker.seams import IntegrationSource

# SQS's limit for one message body.
MAX_QUEUE_BODY_BYTES = 256 * 1024


def check_caller(caller: Caller, integration: Integration) -> None:
    """Raise ``caller_not_allowed`` when the integration lists ``allowed_callers`` and ``caller``
    is not among them (an integration without the list takes any caller IAM lets in)."""
    if integration.allowed_callers and not caller.named_in(integration.allowed_callers):
        raise MailbrokerError(
            f"{caller.describe()} may not send through integration {integration.id!r}",
            code="caller_not_allowed",
        )


class MessageQueue:
    def __init__(
        self,
        sqs_client: Any,
        queue_url: str,
        statuses: MessageStatusStore,
        integrations: IntegrationSource,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sqs = sqs_client
        self._queue_url = queue_url
        self._statuses = statuses
        self._integrations = integrations
        self._clock = clock

    def enqueue(
        self, raw: str | bytes | Mapping[str, Any], *, caller: Caller | None = None
    ) -> dict[str, str]:
        """Validate and queue one message; answers ``{"id", "status"}``. Raises ``InvalidMessage``
        (every problem in ``details``), ``UnknownIntegration``, ``SenderNotAllowed`` or, when the
        integration lists ``allowed_callers`` and ``caller`` is not among them, ``caller_not_allowed``."""
        message = parse_message(raw)
        integration = self._integrations.get(message.integration)
        if caller is not None:
            check_caller(caller, integration)
        check_allowed(with_sender_defaults(message, integration), integration)
        message_id = message.id or uuid.uuid4().hex
        body = _queue_body(raw, message_id, has_id=message.id is not None)
        size = len(body.encode("utf-8"))
        if size > MAX_QUEUE_BODY_BYTES:
            raise InvalidMessage(
                f"message is {size} bytes; the queue takes at most {MAX_QUEUE_BODY_BYTES}",
                details=[
                    {
                        "field": "(root)",
                        "problem": f"larger than the queue's {MAX_QUEUE_BODY_BYTES // 1024} KiB limit "
                        "(attachments are base64 inside the JSON): send smaller attachments or a link",
                    }
                ],
            )

        seen = self._statuses.load(message_id)
        if seen and seen.is_live(self._clock()) and seen.status in IN_FLIGHT:
            return {"id": message_id, "status": seen.status}
        try:
            record = self._statuses.queue(message_id, integration.id, seen)
        except StatusConflict:
            current = self._statuses.get(message_id)
            return {"id": message_id, "status": current.status if current else "queued"}

        try:
            self._sqs.send_message(QueueUrl=self._queue_url, MessageBody=body)
        except Exception as exc:
            code = aws_error_code(exc)
            error = AwsUnavailable(f"SQS SendMessage failed: {code}")
            try:
                # Leave the id re-postable: a failed record does not hold a second post back.
                self._statuses.failed(
                    message_id, integration.id, record, error=error_record(error), attempts=0
                )
            except Exception:
                logger.exception("could not record a failed enqueue", extra={"message_id": message_id})
            raise error from exc
        logger.info("message queued", extra={"message_id": message_id, "integration": integration.id})
        return {"id": message_id, "status": "queued"}


def _queue_body(raw: str | bytes | Mapping[str, Any], message_id: str, *, has_id: bool) -> str:
    """The caller's JSON as it was posted, with the id added when the caller gave none."""
    if has_id and isinstance(raw, str):
        return raw
    if has_id and isinstance(raw, bytes | bytearray):
        return bytes(raw).decode("utf-8")
    data = dict(raw) if isinstance(raw, Mapping) else json.loads(raw)
    data["id"] = message_id
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# SQS message attributes are limited to 256 KiB with the body; keep the error's text short.
_ATTRIBUTE_CHARS = 1024
# maxReceiveCount per send queue URL, read once per execution environment.
_MAX_RECEIVES: dict[str, int | None] = {}


class QueueActions:
    """What the sender does to a received message besides deleting it: put it back for later
    (``ChangeMessageVisibility``) or move it to the dead-letter queue with its error attached."""

    def __init__(self, sqs_client: Any, queue_url: str, dead_letter_queue_url: str) -> None:
        self._sqs = sqs_client
        self.queue_url = queue_url
        self.dead_letter_queue_url = dead_letter_queue_url

    def max_receive_count(self) -> int | None:
        """The send queue's ``maxReceiveCount`` (its redrive policy), read once per environment;
        None when it has none or it cannot be read."""
        if self.queue_url not in _MAX_RECEIVES:
            try:
                attributes = self._sqs.get_queue_attributes(
                    QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"]
                ).get("Attributes", {})
                policy = json.loads(attributes.get("RedrivePolicy") or "{}")
                _MAX_RECEIVES[self.queue_url] = int(policy["maxReceiveCount"]) if policy else None
            except Exception as exc:
                code = aws_error_code(exc)
                logger.warning("could not read the send queue's redrive policy", extra={"aws_error": code})
                return None
        return _MAX_RECEIVES[self.queue_url]

    def delay(self, receipt_handle: str, seconds: int) -> bool:
        """Make the message visible again in ``seconds``. False if SQS refused (the queue's own
        visibility timeout then applies: the message is late, never lost)."""
        try:
            self._sqs.change_message_visibility(
                QueueUrl=self.queue_url, ReceiptHandle=receipt_handle, VisibilityTimeout=int(seconds)
            )
        except Exception as exc:
            code = aws_error_code(exc)
            logger.warning("could not change a message's visibility", extra={"aws_error": code})
            return False
        return True

    def dead_letter(self, body: str, attributes: Mapping[str, str | None]) -> None:
        """Send ``body`` to the dead-letter queue with string ``attributes`` (empty ones left out).
        Raises ``AwsUnavailable``: the caller keeps the message on the send queue then."""
        message_attributes = {
            name: {"DataType": "String", "StringValue": _attribute_text(value)}
            for name, value in attributes.items()
            if value
        }
        try:
            self._sqs.send_message(
                QueueUrl=self.dead_letter_queue_url, MessageBody=body, MessageAttributes=message_attributes
            )
        except Exception as exc:
            code = aws_error_code(exc)
            raise AwsUnavailable(f"SQS SendMessage to the dead-letter queue failed: {code}") from exc


def _attribute_text(value: str) -> str:
    # SQS accepts only XML characters in attribute values.
    text = "".join(ch if ch in "\t\n\r" or ch >= " " else "?" for ch in value)
    return text if len(text) <= _ATTRIBUTE_CHARS else text[: _ATTRIBUTE_CHARS - 3] + "..."
