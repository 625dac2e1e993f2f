"""Figure 3: connections and AUTHs per batch.

Ten messages for one integration go on the send queue (moto); one SQS batch of ten is handed to
the sender function's handler, which sends them to the sandbox SMTP server. The server counts the
connections it accepted and the AUTH exchanges it granted. Baseline, counted by the same server:
the same ten messages sent the usual way, smtplib with a connection and an AUTH per message.
"""

from __future__ import annotations

import contextlib
import io
import uuid
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

    with environ(sandbox.function_env("SenderFunction")):
        import json

        from mailbroker import runtime
        from mailbroker.integrations import parse_integration

        runtime.integration_store().put(parse_integration(identity))
        records = _queue_and_receive(sandbox, [json.dumps(m) for m in messages])
        before = _counters(server)
        with contextlib.redirect_stdout(io.StringIO()):  # the handler's metrics (EMF) and logs
            answer = handler("sender")({"Records": records}, LambdaContext("mailbroker-sender"))
        mailbroker = _delta(server, before)
    if answer.get("batchItemFailures") or mailbroker["accepted"] != BATCH:
        raise RuntimeError(f"the sender delivered {mailbroker['accepted']} of {BATCH}: {answer}")

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


def _counters(server: Any) -> dict[str, int]:
    return {
        "connections": server.connections,
        "auths": server.auth_successes,
        "accepted": len(server.accepted),
    }


def _delta(server: Any, before: dict[str, int]) -> dict[str, int]:
    now = _counters(server)
    return {name: now[name] - before[name] for name in now}
