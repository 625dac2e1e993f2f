"""Figure 3: connections, AUTHs and DynamoDB requests per batch.

Ten messages for one integration are queued as ``POST /v1/messages`` queues them (a ``queued``
status record each, then the send queue on moto); one SQS batch of ten is handed to the sender
function's handler, which sends them to the sandbox SMTP server. The server counts the
connections it accepted and the AUTH exchanges it granted. Baseline, counted by the same server:
the same ten messages sent the usual way, smtplib with a connection and an AUTH per message.

The same batch counts the sender's DynamoDB requests by operation (a botocore ``before-call``
hook on the client the sender uses), with the integration's token already cached (tokens warm):
the happy path's bookkeeping per delivered message. Baseline: ten more messages through the same
handler one per invocation (a queue with batch size 1, or a trickle of traffic), where nothing is
shared across messages.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from bench import Row, Target
from bench.environment import LambdaContext, environ, handler, outgoing, sqs_records
from bench.smtp_round_trips import fetch_token, smtplib_connection

BATCH = 10


def run(sandbox: Any, *, smoke: bool) -> list[Row]:
    server = sandbox.smtp_server(pipelining=True, chunking=True)
    identity = sandbox.microsoft_identity("batch", server)
    identity["limits"] = {"messages_per_minute": 10_000, "max_connections": 10}
    run_id = uuid.uuid4().hex[:8]
    messages = [outgoing(identity, f"batch-{run_id}-{i}") for i in range(BATCH)]

    singles = [outgoing(identity, f"single-{run_id}-{i}") for i in range(BATCH)]
    with environ(sandbox.function_env("SenderFunction")):
        from mailbroker import runtime
        from mailbroker.integrations import parse_integration

        runtime.integration_store().put(parse_integration(identity))
        runtime.token_broker().token_for(identity["id"])  # tokens warm
        before = _counters(server)
        answers, dynamodb = _deliver_queued(sandbox, identity, messages, per_invocation=BATCH)
        mailbroker = _delta(server, before)
        # Baseline for the bookkeeping: the same sender handed the same kind of messages one
        # per invocation, as a queue with batch size 1 (or a trickle of traffic) does.
        single_answers, single = _deliver_queued(sandbox, identity, singles, per_invocation=1)
    failures = [f for answer in answers + single_answers for f in answer.get("batchItemFailures", [])]
    if failures or mailbroker["accepted"] != BATCH:
        raise RuntimeError(f"the sender delivered {mailbroker['accepted']} of {BATCH}: {failures}")

    token = fetch_token(sandbox, identity)
    context = sandbox.ca.client_context()
    before = _counters(server)
    for m in messages:
        client = smtplib_connection("127.0.0.1", server.port, identity["username"], token, context)
        client.sendmail(identity["username"], m["to"], f"Subject: {m['subject']}\r\n\r\n{m['text']}")
        client.quit()
    baseline = _delta(server, before)

    details = {"batch": BATCH, "mailbroker": mailbroker, "smtplib": baseline}
    return [
        Row(
            f"DynamoDB requests per delivered message, batch of {BATCH}",
            sum(dynamodb.values()) / BATCH,
            sum(single.values()) / BATCH,
            baseline_label="one message per invocation",
            target=Target(3),
            details={
                "by_operation_per_message": _per_message(dynamodb),
                "one_per_invocation_by_operation_per_message": _per_message(single),
            },
        ),
        Row(
            f"SMTP connections per batch of {BATCH}",
            mailbroker["connections"],
            baseline["connections"],
            baseline_label="smtplib per message",
            target=Target(1),
            details=details,
        ),
        Row(
            f"SMTP AUTHs per batch of {BATCH}",
            mailbroker["auths"],
            baseline["auths"],
            baseline_label="smtplib per message",
            target=Target(1),
            details=details,
        ),
    ]


def _deliver_queued(
    sandbox: Any, identity: dict[str, Any], messages: list[dict[str, Any]], *, per_invocation: int
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Queue ``messages`` as the API does (a ``queued`` status record each, then the send queue),
    hand them to the sender's handler ``per_invocation`` at a time, and count its DynamoDB
    requests by operation."""
    import json

    from mailbroker import runtime
    from mailbroker.settings import SenderSettings, get_settings

    statuses = runtime.status_store(get_settings(SenderSettings))
    for m in messages:
        statuses.queue(m["id"], identity["id"], None)
    records = _queue_and_receive(sandbox, [json.dumps(m) for m in messages])
    answers = []
    with contextlib.redirect_stdout(io.StringIO()), count_dynamodb() as counts:  # metrics (EMF), logs
        for start in range(0, len(records), per_invocation):
            event = {"Records": records[start : start + per_invocation]}
            answers.append(handler("sender")(event, LambdaContext("mailbroker-sender")))
    return answers, counts


def _per_message(counts: Counter[str]) -> dict[str, float]:
    return {name: round(n / BATCH, 2) for name, n in sorted(counts.items())}


def _queue_and_receive(sandbox: Any, bodies: list[str]) -> list[dict[str, Any]]:
    from mailbroker import runtime

    sqs = runtime.aws_client("sqs")
    queue_url = sandbox.aws.resources["SendQueue"]
    sqs.send_message_batch(
        QueueUrl=queue_url, Entries=[{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies)]
    )
    received: list[dict[str, Any]] = []
    for _ in range(20):
        answer = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=BATCH - len(received),
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
            WaitTimeSeconds=1,
        )
        received.extend(answer.get("Messages", []))
        if len(received) >= BATCH:
            break
    if len(received) != BATCH:
        raise RuntimeError(f"received {len(received)} of {BATCH} queued messages")
    return sqs_records(received, sandbox.aws.attribute("SendQueue", "Arn"))


@contextlib.contextmanager
def count_dynamodb() -> Iterator[Counter[str]]:
    """Count every DynamoDB request the runtime's client makes, by operation, while inside."""
    from mailbroker import runtime

    counts: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        counts[model.name] += 1

    events = runtime.aws_client("dynamodb").meta.events
    events.register("before-call.dynamodb", count, unique_id="bench-count-dynamodb")
    try:
        yield counts
    finally:
        events.unregister("before-call.dynamodb", unique_id="bench-count-dynamodb")


def _counters(server: Any) -> dict[str, int]:
    return {
        "connections": server.connections,
        "auths": server.auth_successes,
        "accepted": len(server.accepted),
    }


def _delta(server: Any, before: dict[str, int]) -> dict[str, int]:
    now = _counters(server)
    return {name: now[name] - before[name] for name in now}
