"""Figure 5: throughput through the sandbox, queue to SMTP acceptance.

1,000 messages across 5 integrations wait on the send queue (moto SQS). Four worker processes —
four warm sender execution environments — each do what Lambda's SQS event source does: receive up
to 10 messages, invoke the sender function's handler with them, delete the ones it did not report
as failed. The clock runs from the moment the workers start polling until the sandbox SMTP server
(PIPELINING and CHUNKING, as Office 365 and Gmail offer) has accepted every message.

The floor, in the same run: the same messages (the same MIME bytes mailbroker builds), pushed
straight to the same server by a minimal client in its own process — one authenticated
connection per integration, transactions written back to back with BDAT, 50 at a time, replies
read after. Ratio = mailbroker's wall time ÷ the floor's.

Each worker also times the AWS calls it makes (botocore ``before-call``/``after-call`` hooks), so
the figure says where its time goes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench import Row, Target
from bench.environment import environ, outgoing

INTEGRATIONS = 5
WORKERS = 4
TARGET_RATIO = 10.0
WINDOW = 50  # transactions the floor client has in flight


def run(sandbox: Any, *, smoke: bool) -> list[Row]:
    total = 40 if smoke else 1000
    workers = 2 if smoke else WORKERS
    server = sandbox.smtp_server(pipelining=True, chunking=True)
    identities = []
    for i in range(INTEGRATIONS):
        identity = sandbox.microsoft_identity(f"throughput-{i}", server)
        identity["limits"] = {"messages_per_minute": 100_000, "max_connections": WORKERS}
        identities.append(identity)
    run_id = uuid.uuid4().hex[:8]
    messages = [outgoing(identities[i % INTEGRATIONS], f"tp-{run_id}-{i}") for i in range(total)]
    env = sandbox.function_env("SenderFunction")
    queue_url = sandbox.aws.resources["SendQueue"]

    with environ(env):
        from mailbroker import runtime
        from mailbroker.integrations import parse_integration

        store = runtime.integration_store()
        for identity in identities:
            store.put(parse_integration(identity))
        sqs = runtime.aws_client("sqs")
        for start in range(0, total, 10):
            sqs.send_message_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(n), "MessageBody": json.dumps(m)}
                    for n, m in enumerate(messages[start : start + 10])
                ],
            )

    mailbroker = _through_the_sender(sandbox, server, env, [i["id"] for i in identities], total, workers)
    floor = _floor(sandbox, server, identities, messages)
    details = {
        "messages": total,
        "integrations": INTEGRATIONS,
        "workers": workers,
        "mailbroker_s": round(mailbroker["seconds"], 3),
        "floor_s": round(floor, 3),
        "mailbroker_messages_per_s": round(total / mailbroker["seconds"], 1),
        "floor_messages_per_s": round(total / floor, 1),
        **{k: v for k, v in mailbroker.items() if k != "seconds"},
    }
    return [
        Row(
            f"throughput: {total:,} messages, {workers} workers, queue → SMTP",
            mailbroker["seconds"],
            floor,
            unit="s",
            baseline_label="pipelined raw client",
            target=Target(TARGET_RATIO, on="ratio"),
            details=details,
        )
    ]


# --- mailbroker: queue → sender handler → SMTP ----------------------------------------------------


def _through_the_sender(
    sandbox: Any, server: Any, env: dict[str, str], ids: list[str], total: int, n_workers: int
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    spec = {
        "queue_url": sandbox.aws.resources["SendQueue"],
        "queue_arn": sandbox.aws.attribute("SendQueue", "Arn"),
        "integrations": ids,
    }
    before = {
        "accepted": len(server.accepted),
        "connections": server.connections,
        "auths": server.auth_successes,
    }
    workers = [
        ctx.Process(target=worker, args=(env, spec, go, stop, results), daemon=True) for _ in range(n_workers)
    ]
    reports: list[dict[str, Any]] = []
    try:
        for process in workers:
            process.start()
        _wait_for(results, "ready", n_workers, workers, 180)
        go.set()
        started = time.monotonic()
        deadline = started + (120 if total <= 100 else 600)
        while len(server.accepted) - before["accepted"] < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(server.accepted) - before['accepted']} of {total} accepted in time")
            if not any(p.is_alive() for p in workers):
                raise RuntimeError("every sender worker stopped")
            time.sleep(0.005)
        seconds = time.monotonic() - started
        stop.set()
        reports = _wait_for(results, "done", n_workers, workers, 120)
    finally:
        stop.set()
        for process in workers:  # every report is in: no need to wait for interpreters to wind down
            process.terminate()
        for process in workers:
            process.join(timeout=10)
    calls: Counter[str] = Counter()
    aws_seconds: Counter[str] = Counter()
    busy_seconds = 0.0
    batches = failures = 0
    for report in reports:
        calls.update(report["aws_calls"])
        aws_seconds.update(report["aws_seconds"])
        busy_seconds += report["busy_seconds"]
        batches += report["batches"]
        failures += report["failures"]
    return {
        "seconds": seconds,
        "batches": batches,
        "records_reported_failed": failures,
        "smtp_connections": server.connections - before["connections"],
        "smtp_auths": server.auth_successes - before["auths"],
        "aws_calls_per_message": round(sum(calls.values()) / total, 2),
        "aws_calls": dict(calls.most_common()),
        "worker_busy_s": round(busy_seconds, 2),
        # Of the time the workers spent on batches, the share spent waiting on DynamoDB (moto).
        "busy_share_in_dynamodb": round(aws_seconds["dynamodb"] / busy_seconds, 3) if busy_seconds else None,
        "aws_seconds": {service: round(s, 2) for service, s in aws_seconds.items()},
    }


def _wait_for(results: Any, kind: str, n: int, processes: list[Any], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while len(got) < n:
        try:
            message = results.get(timeout=1.0)
        except queue.Empty:
            if time.monotonic() > deadline or all(not p.is_alive() for p in processes):
                raise RuntimeError(f"{len(got)} of {n} sender workers reported {kind!r}") from None
            continue
        if message["kind"] == "failed":
            raise RuntimeError(f"a sender worker failed: {message['error']}")
        if message["kind"] == kind:
            got.append(message)
    return got


class _AwsTimer:
    """botocore hooks: counts each API call and adds up the time spent in it."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()  # by service

    def before(self, context: dict[str, Any], **kwargs: Any) -> None:
        context["bench_started"] = time.perf_counter()

    def after(self, event_name: str, context: dict[str, Any], **kwargs: Any) -> None:
        _, service, operation = event_name.split(".", 2)
        self.calls[f"{service}.{operation}"] += 1
        self.seconds[service] += time.perf_counter() - context.get("bench_started", time.perf_counter())


def worker(env: dict[str, str], spec: dict[str, Any], go: Any, stop: Any, results: Any) -> None:
    """One warm sender execution environment fed by a stand-in for Lambda's SQS event source."""
    import warnings

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the process's lifetime
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    os.environ.update(env)
    try:
        import boto3

        boto3.setup_default_session()
        timer = _AwsTimer()
        boto3.DEFAULT_SESSION.events.register("before-call", timer.before)
        boto3.DEFAULT_SESSION.events.register("after-call", timer.after)

        from mailbroker import runtime

        from bench.environment import LambdaContext, handler, sqs_records

        lambda_handler = handler("sender")
        sqs = runtime.aws_client("sqs")
        for integration_id in spec["integrations"]:  # a warm environment: secrets and tokens in memory
            runtime.token_broker().token_for(integration_id)
        timer.calls.clear()
        timer.seconds.clear()
    except Exception as exc:
        results.put({"kind": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    results.put({"kind": "ready"})
    go.wait()
    busy = 0.0
    batches = failures = 0
    while not stop.is_set():
        started = time.perf_counter()
        received = sqs.receive_message(
            QueueUrl=spec["queue_url"],
            MaxNumberOfMessages=10,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
            WaitTimeSeconds=1,
        ).get("Messages", [])
        if not received:
            continue
        answer = lambda_handler(
            {"Records": sqs_records(received, spec["queue_arn"])}, LambdaContext("mailbroker-sender")
        )
        failed = {f["itemIdentifier"] for f in answer.get("batchItemFailures", [])}
        done = [m for m in received if m["MessageId"] not in failed]
        if done:
            sqs.delete_message_batch(
                QueueUrl=spec["queue_url"],
                Entries=[{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done)],
            )
        busy += time.perf_counter() - started
        batches += 1
        failures += len(failed)
    results.put(
        {
            "kind": "done",
            "aws_calls": dict(timer.calls),
            "aws_seconds": dict(timer.seconds),
            "busy_seconds": busy,
            "batches": batches,
            "failures": failures,
        }
    )


# --- the floor: a minimal pipelined client -------------------------------------------------------


def _floor(
    sandbox: Any, server: Any, identities: list[dict[str, Any]], messages: list[dict[str, Any]]
) -> float:
    from mailbroker.messages.mime import build_mime, envelope
    from mailbroker.messages.models import parse_message

    from bench.smtp_round_trips import fetch_token

    jobs = []
    for identity in identities:
        transactions = []
        for raw in messages:
            if raw["integration"] != identity["id"]:
                continue
            message = parse_message(raw)
            mail_from, rcpts = envelope(message)
            data = build_mime(message, message_id_domain=message.from_.domain).as_bytes()
            transactions.append((mail_from, rcpts, data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")))
        jobs.append((identity["username"], fetch_token(sandbox, identity), transactions))
    before = len(server.accepted)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        seconds = pool.submit(floor_client, server.port, str(sandbox.ca.ca_cert), jobs).result(timeout=300)
    arrived = len(server.accepted) - before
    if arrived != len(messages):
        raise RuntimeError(f"the floor client delivered {arrived} of {len(messages)}")
    return seconds


def floor_client(
    port: int, cafile: str, jobs: list[tuple[str, str, list[tuple[str, list[str], bytes]]]]
) -> float:
    import ssl

    from bench.smtp_round_trips import smtplib_connection

    context = ssl.create_default_context(cafile=cafile)
    started = time.perf_counter()
    for username, token, transactions in jobs:
        client = smtplib_connection("127.0.0.1", port, username, token, context)
        for start in range(0, len(transactions), WINDOW):
            window = transactions[start : start + WINDOW]
            client.send(
                b"".join(
                    f"MAIL FROM:<{mail_from}>\r\n".encode()
                    + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
                    + f"BDAT {len(data)} LAST\r\n".encode()
                    + data
                    for mail_from, rcpts, data in window
                )
            )
            for _, rcpts, _ in window:
                for _ in range(2 + len(rcpts)):
                    code, text = client.getreply()
                    if code != 250:
                        raise RuntimeError(f"the server answered {code} {text!r}")
        client.quit()
    return time.perf_counter() - started
