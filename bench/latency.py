"""Figure 8: end-to-end latency of one message on a warm path, from ``POST /v1/messages`` to the
SMTP server's ``250``.

The token broker function's handler takes each ``POST /v1/messages`` (API Gateway's payload 2.0
event, IAM-authorised), writes the ``queued`` status record and queues the message on the send
queue (moto SQS). A warm sender execution environment in its own process, fed as Lambda's SQS
event source feeds it (a long poll, then the handler with the batch), delivers it to the sandbox
SMTP server (STARTTLS, PIPELINING and CHUNKING) on its kept session. Messages go one at a time,
each after the previous one's 250, so each latency is one message's own; a few go first,
uncounted, to warm the path. The clock starts before the POST and stops when the server takes
the message (:attr:`AcceptedMessage.accepted_at`, the same process's clock).

Baseline, in the same run: the same queue and server with no broker in between: ``SendMessage``,
a ``ReceiveMessage`` long poll, one ``sendmail`` on an authenticated smtplib connection kept open,
``DeleteMessage``: what the queue and the SMTP transaction cost by themselves. It runs in the
measuring process, so it does not pay the wake-up of another process's long poll.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
import uuid
from typing import Any

from bench import Row
from bench.environment import environ, outgoing
from bench.smtp_round_trips import fetch_token, smtplib_connection
from bench.throughput import _wait_for, worker

WARM_UP = 3


def run(sandbox: Any, *, smoke: bool) -> list[Row]:
    total = 10 if smoke else 200
    server = sandbox.smtp_server(pipelining=True, chunking=True)
    identity = sandbox.microsoft_identity("latency", server)
    identity["limits"] = {"messages_per_minute": 100_000, "max_connections": 2}
    sender_env = sandbox.function_env("SenderFunction")
    with environ(sender_env):
        from mailbroker import runtime
        from mailbroker.integrations import parse_integration

        runtime.integration_store().put(parse_integration(identity))

    connections = server.connections
    mailbroker = _through_the_api(sandbox, server, identity, sender_env, total)
    connections = server.connections - connections
    baseline = _queue_and_smtp_alone(sandbox, server, identity, total)
    details = {
        "messages": total,
        "warm_up_messages": WARM_UP,
        "mailbroker_smtp_connections": connections,  # 1: every invocation used the kept session
        "mailbroker_ms": _summary(mailbroker),
        "baseline_ms": _summary(baseline),
    }
    label = "SQS send + long-poll receive + sendmail on an open connection"
    return [
        Row(
            "end-to-end latency, median: POST /v1/messages → server's 250 (warm sender, kept session)",
            statistics.median(mailbroker) * 1000,
            statistics.median(baseline) * 1000,
            unit="ms",
            baseline_label=label,
            details=details,
        ),
        Row(
            "end-to-end latency, p99: POST /v1/messages → server's 250 (warm sender, kept session)",
            _p99(mailbroker) * 1000,
            _p99(baseline) * 1000,
            unit="ms",
            baseline_label=label,
            details=details,
        ),
    ]


def _through_the_api(
    sandbox: Any, server: Any, identity: dict[str, Any], sender_env: dict[str, str], total: int
) -> list[float]:
    from bench.environment import handler
    from mailbroker_sandbox.events import LambdaContext, http_event

    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    spec = {
        "queue_url": sandbox.aws.resources["SendQueue"],
        "queue_arn": sandbox.aws.attribute("SendQueue", "Arn"),
        "integrations": [identity["id"]],
    }
    process = ctx.Process(target=worker, args=(sender_env, spec, go, stop, results), daemon=True)
    latencies: list[float] = []
    try:
        process.start()
        _wait_for(results, "ready", 1, [process], 180)
        go.set()
        with environ(sandbox.function_env("TokenBrokerFunction")):
            api = handler("token_broker")
            run_id = uuid.uuid4().hex[:8]
            for n in range(WARM_UP + total):
                body = outgoing(identity, f"lat-{run_id}-{n}")
                before = len(server.accepted)
                started = time.perf_counter()
                answer = api(http_event("POST /v1/messages", body=body), LambdaContext("mailbroker-api"))
                if answer["statusCode"] != 202:
                    raise RuntimeError(f"POST /v1/messages answered {answer['statusCode']}: {answer['body']}")
                accepted = _next_accepted(server, before, process)
                if n >= WARM_UP:
                    latencies.append(accepted - started)
    finally:
        stop.set()
        process.join(timeout=15)
        if process.is_alive():
            process.terminate()
            process.join(timeout=10)
    return latencies


def _queue_and_smtp_alone(sandbox: Any, server: Any, identity: dict[str, Any], total: int) -> list[float]:
    from mailbroker.messages.mime import build_mime, envelope
    from mailbroker.messages.models import parse_message

    queue_url = sandbox.aws.resources["SendQueue"]
    latencies: list[float] = []
    with environ(sandbox.function_env("SenderFunction")):
        from mailbroker import runtime

        sqs = runtime.aws_client("sqs")
        context = sandbox.ca.client_context()
        client = smtplib_connection(
            "127.0.0.1", server.port, identity["username"], fetch_token(sandbox, identity), context
        )
        try:
            run_id = uuid.uuid4().hex[:8]
            for n in range(WARM_UP + total):
                raw = outgoing(identity, f"base-{run_id}-{n}")
                before = len(server.accepted)
                started = time.perf_counter()
                sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(raw))
                received: list[dict[str, Any]] = []
                while not received:
                    received = sqs.receive_message(
                        QueueUrl=queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=1
                    ).get("Messages", [])
                message = parse_message(json.loads(received[0]["Body"]))
                mail_from, rcpts = envelope(message)
                data = build_mime(message, message_id_domain=message.from_.domain).as_bytes()
                client.sendmail(mail_from, rcpts, data)
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=received[0]["ReceiptHandle"])
                if len(server.accepted) != before + 1:
                    raise RuntimeError("the baseline's message did not arrive")
                if n >= WARM_UP:
                    latencies.append(server.accepted[-1].accepted_at - started)
        finally:
            client.quit()
    return latencies


def _next_accepted(server: Any, before: int, process: Any, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while len(server.accepted) <= before:
        if time.monotonic() > deadline or not process.is_alive():
            raise RuntimeError("the posted message did not arrive at the SMTP server")
        time.sleep(0.001)
    if len(server.accepted) != before + 1:
        raise RuntimeError("more than one message arrived for one POST")
    return float(server.accepted[before].accepted_at)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": round(ordered[0] * 1000, 1),
        "median": round(statistics.median(ordered) * 1000, 1),
        "p90": round(ordered[round(0.9 * (len(ordered) - 1))] * 1000, 1),
        "p99": round(_p99(ordered) * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }
