"""``mailbroker send``, ``mailbroker status ID`` and ``mailbroker dlq list|redrive``."""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailbroker.errors import InvalidMessage, MailbrokerError
from mailbroker.settings import MessageTableEnv, SendQueueEnv

from mailbroker_cli.context import CliError, Context
from mailbroker_cli.integrations import parse_sender, read_json
from mailbroker_cli.output import Output

if TYPE_CHECKING:
    from mailbroker.messages.queue import MessageQueue
    from mailbroker.messages.status import MessageStatusStore

FINAL = ("sent", "failed")
STATUS_COLOURS = {"sent": "green", "failed": "red", "retrying": "yellow", "queued": "blue", "sending": "blue"}
RECIPIENT_COLOURS = {"delivered": "green", "failed": "red", "retrying": "yellow"}
# How long a message stays hidden while `dlq` walks the queue; each is made visible again at once.
_PEEK_SECONDS = 30


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    send = commands.add_parser(
        "send",
        parents=[common],
        help="queue a message (from flags or a JSON file)",
        description="Validate a message and put it on the send queue; --wait follows its status.",
    )
    send.add_argument("--file", metavar="FILE", help="the message JSON ('-' for stdin)")
    send.add_argument("--integration", "-i")
    send.add_argument("--id", help="idempotency key (default: generated)")
    send.add_argument("--from", dest="sender", metavar="EMAIL[=NAME]")
    send.add_argument("--to", action="append", metavar="EMAIL[=NAME]")
    send.add_argument("--cc", action="append", metavar="EMAIL[=NAME]")
    send.add_argument("--bcc", action="append", metavar="EMAIL[=NAME]")
    send.add_argument("--reply-to", metavar="EMAIL")
    send.add_argument("--subject")
    send.add_argument("--text", help="plain-text body ('@FILE' reads it from a file)")
    send.add_argument("--html", help="HTML body ('@FILE' reads it from a file)")
    send.add_argument("--usage", help="e.g. transactional")
    send.add_argument("--header", action="append", metavar="NAME=VALUE")
    send.add_argument("--attach", action="append", metavar="FILE")
    send.add_argument(
        "--wait", action="store_true", help="poll the status until the message is sent or failed"
    )
    send.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits (default 120)")
    send.set_defaults(handler=send_message)

    test = commands.add_parser(
        "test",
        parents=[common],
        help="send a labelled test mail through the whole path",
        description="Queue a short, clearly labelled test mail from the integration's default sender "
        "(the first of its senders, else its username) and, with --wait, follow it through the sender "
        "to the SMTP server's reply, printing each step; a failure prints its code and hint.",
    )
    test.add_argument("id", metavar="ID", help="the integration")
    test.add_argument("--to", required=True, metavar="EMAIL", help="who receives the test mail")
    test.add_argument("--wait", action="store_true", help="follow it until it is sent or failed")
    test.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits (default 120)")
    test.set_defaults(handler=send_test)

    status = commands.add_parser("status", parents=[common], help="a message's status record")
    status.add_argument("id")
    status.set_defaults(handler=message_status)

    dlq = commands.add_parser("dlq", help="messages that failed for good")
    sub = dlq.add_subparsers(dest="action", required=True, metavar="{list,redrive}")
    listing = sub.add_parser("list", parents=[common], help="what waits in the dead-letter queue, and why")
    listing.add_argument("--max", type=int, default=100, help="list at most this many (default 100)")
    listing.set_defaults(handler=dlq_list)
    redrive = sub.add_parser(
        "redrive",
        parents=[common],
        help="put dead-lettered messages back on the send queue",
        description="Re-queue dead-lettered messages once their cause is fixed: each is validated and "
        "queued again (status 'queued'), then removed from the dead-letter queue.",
    )
    chosen = redrive.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--id", action="append", dest="ids", metavar="MESSAGE_ID", help="only this message")
    chosen.add_argument("--all", action="store_true", help="every message in the dead-letter queue")
    redrive.add_argument("--integration", help="only messages for this integration")
    redrive.set_defaults(handler=dlq_redrive)


# --- send / status ----------------------------------------------------------------------------------


def message_queue(ctx: Context) -> MessageQueue:
    from mailbroker import runtime

    return runtime.message_queue(ctx.needs(SendQueueEnv), status_store(ctx), ctx.integrations)


def status_store(ctx: Context) -> MessageStatusStore:
    from mailbroker import runtime

    return runtime.status_store(ctx.needs(MessageTableEnv))


def build_message(args: argparse.Namespace) -> dict[str, Any]:
    """The message JSON from --file, overridden by the flags given."""
    message: dict[str, Any] = {}
    if args.file:
        message = read_json(args.file)
        if not isinstance(message, dict):
            raise CliError(f"{args.file} does not hold a JSON object")
    message.update(_addressing(args))
    if args.subject is not None:
        message["subject"] = args.subject
    for field in ("text", "html"):
        value = getattr(args, field)
        if value is not None:
            message[field] = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    if args.header:
        message["headers"] = _headers(dict(message.get("headers") or {}), args.header)
    attachments = [_attachment(path) for path in args.attach or []]
    if attachments:
        message["attachments"] = [*message.get("attachments", []), *attachments]
    return message


def _addressing(args: argparse.Namespace) -> dict[str, object]:
    """Integration, id, usage and the addresses, for the flags that were given."""
    fields: dict[str, object] = {
        name: value
        for name, value in (
            ("integration", args.integration),
            ("id", args.id),
            ("reply_to", args.reply_to),
            ("usage", args.usage),
        )
        if value
    }
    if args.sender:
        fields["from"] = parse_sender(args.sender)
    for field in ("to", "cc", "bcc"):
        values = getattr(args, field)
        if values:
            fields[field] = [parse_sender(v) for v in values]
    return fields


def _headers(headers: dict[str, str], items: list[str]) -> dict[str, str]:
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--header {item!r} is not NAME=VALUE")
        headers[name.strip()] = value
    return headers


def _attachment(path: str) -> dict[str, str]:
    file = Path(path)
    try:
        content = file.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    return {
        "filename": file.name,
        "content_type": mimetypes.guess_type(file.name)[0] or "application/octet-stream",
        "content": base64.b64encode(content).decode("ascii"),
    }


def send_message(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    message = build_message(args)
    try:
        answer = message_queue(ctx).enqueue(message)
    except InvalidMessage as exc:
        if out.as_json:
            out.json({"error": exc.to_dict()})
            return 2
        out.note(f"{out.mark(False)} the message is invalid; nothing was queued:")
        for detail in exc.details:
            out.note(f"  - {detail.get('field')}: {detail.get('problem')}")
        return 2
    if not args.wait:
        if out.as_json:
            out.json(answer)
        else:
            out.line(f"{out.mark(True)} queued {answer['id']} (status {answer['status']})")
            out.note(f"follow it: mailbroker status {answer['id']}")
        return 0
    record = wait_for(ctx, out, answer["id"], args.timeout)
    return show_record(out, record, answer["id"])


def send_test(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    """``mailbroker test ID --to ADDR [--wait]``: each step's result, and a failure's code and hint."""
    from mailbroker.messages.testmail import build_test_mail

    integration = ctx.integrations.get(args.id)  # unknown_integration: reported with its hint
    message = build_test_mail(integration, args.to)
    sender = message["from"]
    if not out.as_json:
        named = f"{sender['name']} <{sender['email']}>" if sender.get("name") else sender["email"]
        out.line(f"{out.mark(True)} integration {integration.id} ({integration.provider}), from {named}")
    try:
        answer = message_queue(ctx).enqueue(message)
    except MailbrokerError as exc:
        if out.as_json:
            out.json({"error": exc.to_dict()})
        else:
            out.line(f"{out.mark(False)} not queued: {exc.code}: {exc.message}")
            for detail in exc.details:
                out.line(f"  - {detail.get('field')}: {detail.get('problem')}")
            if exc.hint:
                out.line(f"  hint: {exc.hint}")
        return 2
    if not out.as_json:
        out.line(f"{out.mark(True)} queued {answer['id']} to {args.to}")
    if not args.wait:
        if out.as_json:
            out.json(answer)
        else:
            out.note(f"follow it: mailbroker status {answer['id']}")
        return 0
    record = wait_for(ctx, out, answer["id"], args.timeout, steps=not out.as_json)
    if out.as_json or record is None:
        return show_record(out, record, answer["id"])
    return show_test_outcome(out, record)


def show_test_outcome(out: Output, record: Any) -> int:
    body = record.to_public()
    if body["status"] == "sent":
        out.line(f"{out.mark(True)} sent: the server answered {body.get('reply')}")
        return 0
    error = body.get("last_error") or {}
    where = "failed" if body["status"] == "failed" else f"{body['status']} (not final yet)"
    out.line(f"{out.mark(False)} {where}: {error.get('code')}: {error.get('message')}")
    if error.get("hint"):
        out.line(f"  hint: {error['hint']}")
    return 1


def wait_for(ctx: Context, out: Output, message_id: str, timeout: float, *, steps: bool = False) -> Any:
    """Poll the status record until it is final (or ``timeout``). ``steps``: print each status it
    passes through as a step on stdout, with the attempt and, while retrying, the last error."""
    statuses = status_store(ctx)
    deadline = time.monotonic() + timeout
    record = None
    last = None
    with out.progress(f"waiting for {message_id}"):
        while time.monotonic() < deadline:
            record = statuses.get(message_id)
            if record is not None and record.status != last and steps and record.status not in FINAL:
                out.line(f"{out.mark(None)} {_step(record.to_public())}")
                last = record.status
            elif record is not None and record.status != last and not out.interactive and not out.as_json:
                out.note(f"  {record.status}")
                last = record.status
            if record is not None and record.status in FINAL:
                return record
            time.sleep(0.5)
    return record


def _step(body: dict[str, Any]) -> str:
    text = f"{body['status']} (attempt {body.get('attempts') or 0})"
    error = body.get("last_error")
    if body["status"] == "retrying" and error:
        text += f": {error.get('code')}: {error.get('message')}"
    return text


def message_status(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    record = status_store(ctx).get(args.id)
    if record is None:
        raise MailbrokerError(
            f"no status record for message {args.id!r}",
            code="invalid_message",
            hint="Records live for the idempotency window (IDEMPOTENCY_HOURS); check the id.",
        )
    return show_record(out, record, args.id)


# One optional line per field of the status record, in the order an operator reads them.
def show_record(out: Output, record: Any, message_id: str) -> int:  # noqa: C901
    if record is None:
        out.error(
            "timeout", f"message {message_id} has no final status yet", "Look again: mailbroker status ID"
        )
        return 1
    body = record.to_public()
    if out.as_json:
        out.json(body)
    else:
        colour = STATUS_COLOURS.get(body["status"], "bold")
        out.line(f"{out.paint('id', 'bold')}: {body['id']}")
        out.line(f"{out.paint('status', 'bold')}: {out.paint(body['status'], colour)}")
        for key in ("integration", "attempts", "created_at", "updated_at", "next_attempt_at", "reply"):
            if body.get(key) is not None:
                out.line(f"{out.paint(key, 'bold')}: {body[key]}")
        error = body.get("last_error")
        if error:
            out.line(f"{out.paint('error', 'bold')}: {error.get('code')}: {error.get('message')}")
            if error.get("hint"):
                out.line(f"{out.paint('hint', 'bold')}: {error['hint']}")
        recipients = body.get("recipients") or []
        if recipients:
            out.line(f"{out.paint('recipients', 'bold')}:")
        for entry in recipients:
            colour = RECIPIENT_COLOURS.get(entry.get("status", ""), "bold")
            said = (
                f"{entry.get('code')}: {entry.get('reply', '')}"
                if entry.get("code")
                else entry.get("reply", "")
            )
            out.line(
                f"  {entry['recipient']:<32} {out.paint(entry.get('status', ''), colour):<9} {said}".rstrip()
            )
            if entry.get("status") != "delivered" and entry.get("hint"):
                out.line(f"  {'':<32} {out.paint('hint', 'bold')}: {entry['hint']}")
        if not recipients:
            for refused in body.get("refused", []):
                out.line(f"{out.paint('refused', 'bold')}: {json.dumps(refused)}")
    if record.status == "failed":
        return 1
    return 0


# --- dead-letter queue ----------------------------------------------------------------------------------


def receive_all(sqs: Any, queue_url: str, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` messages with their attributes, each hidden for a short while: the caller
    deletes the ones it handled and ``release``s the others."""
    found: dict[str, dict[str, Any]] = {}
    while len(found) < limit:
        answer = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=min(10, limit - len(found)),
            VisibilityTimeout=_PEEK_SECONDS,
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            AttributeNames=["All"],
        )
        batch = answer.get("Messages", [])
        if not batch:
            break
        for message in batch:
            found[message["MessageId"]] = message
    return list(found.values())


def release(sqs: Any, queue_url: str, messages: list[dict[str, Any]]) -> None:
    """Make received messages visible again at once."""
    for message in messages:
        sqs.change_message_visibility(
            QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )


def describe(message: dict[str, Any]) -> dict[str, Any]:
    attributes = {k: v.get("StringValue") for k, v in (message.get("MessageAttributes") or {}).items()}
    try:
        body = json.loads(message.get("Body") or "")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    sent = message.get("Attributes", {}).get("SentTimestamp")
    return {
        "message_id": attributes.get("message_id") or body.get("id") or message["MessageId"],
        "integration": attributes.get("integration") or body.get("integration"),
        "error_code": attributes.get("error_code"),
        "error_message": attributes.get("error_message"),
        "hint": attributes.get("error_hint"),
        "dead_lettered_at": _iso_ms(sent),
        "receive_count": int(message.get("Attributes", {}).get("ApproximateReceiveCount", 0)),
        "sqs_message_id": message["MessageId"],
    }


def _iso_ms(value: str | None) -> str | None:
    from mailbroker.health import iso

    return iso(int(value) / 1000) if value else None


def dlq_list(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    url = ctx.require("dead_letter_queue_url", "DEAD_LETTER_QUEUE_URL")
    sqs = ctx.client("sqs")
    with out.progress("reading the dead-letter queue"):
        received = receive_all(sqs, url, args.max)
        release(sqs, url, received)
    entries = [describe(m) for m in received]
    if out.as_json:
        out.json(entries)
        return 0
    if not entries:
        out.line(f"{out.mark(True)} the dead-letter queue is empty")
        return 0
    out.table(
        ["MESSAGE", "INTEGRATION", "ERROR", "DEAD-LETTERED", "WHY"],
        [
            [
                e["message_id"],
                e["integration"],
                e["error_code"] or "(receive limit)",
                e["dead_lettered_at"],
                (e["error_message"] or "")[:80],
            ]
            for e in entries
        ],
    )
    hints = {e["error_code"]: e["hint"] for e in entries if e["error_code"] and e["hint"]}
    if hints:
        out.line()
        for code, hint in hints.items():
            out.line(f"{out.paint(code, 'bold')}: {hint}")
    out.line()
    out.note("once the cause is fixed: mailbroker dlq redrive --id MESSAGE (or --all)")
    return 0


def dlq_redrive(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    url = ctx.require("dead_letter_queue_url", "DEAD_LETTER_QUEUE_URL")
    sqs = ctx.client("sqs")
    queue = message_queue(ctx)
    wanted = set(args.ids or [])
    results: list[dict[str, Any]] = []
    with out.progress("re-driving"):
        received = receive_all(sqs, url, 10_000)
        untouched = []
        try:
            for message in received:
                entry = describe(message)
                chosen = (not wanted or entry["message_id"] in wanted) and (
                    not args.integration or entry["integration"] == args.integration
                )
                if not chosen:
                    untouched.append(message)
                    continue
                try:
                    answer = queue.enqueue(message["Body"])
                except MailbrokerError as exc:
                    untouched.append(message)
                    results.append(
                        {"message_id": entry["message_id"], "redriven": False, "error": exc.to_dict()}
                    )
                    continue
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
                results.append({"message_id": answer["id"], "redriven": True, "status": answer["status"]})
        finally:
            release(sqs, url, untouched)
    missing = sorted(wanted - {r["message_id"] for r in results})
    if out.as_json:
        out.json({"results": results, "not_found": missing})
    else:
        for result in results:
            if result["redriven"]:
                out.line(f"{out.mark(True)} {result['message_id']} queued again")
            else:
                error = result["error"]
                out.line(f"{out.mark(False)} {result['message_id']}: {error['code']}: {error['message']}")
        for message_id in missing:
            out.line(f"{out.mark(False)} {message_id}: not in the dead-letter queue")
        if not results and not missing:
            out.line("nothing to re-drive")
    return 0 if all(r["redriven"] for r in results) and not missing else 1
