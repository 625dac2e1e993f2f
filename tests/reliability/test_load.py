"""Load: messages across five integrations (one of each provider type, a mailbox each) sent by
four sender environments — separate processes, each with its own memory, racing through one
DynamoDB and one queue — while the SMTP server refuses 5 % of the messages once (451, transient)
and 1 % for good (550, permanent), chosen at random.

Then every id is accounted for (sent and delivered exactly once, or failed as recipient_rejected
in the dead-letter queue), nothing is left on the queue, no Message-ID reached the server twice,
each credential's token was issued at most once in its lifetime, and no mailbox ever had more
SMTP sessions open at once than its ``max_connections``, nor more messages in any window than
its message bucket allows — both measured at the server.

The default run sends 60 messages; ``--long`` sends 1,000. The figures are printed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailbroker.governor import Pace
from mailbroker.messages.mime import message_id_for

from mailbroker_sandbox.smtp_server import SandboxSmtpServer
from tests.fixtures.pipeline import MailPipeline, TokenGate
from tests.reliability import load_worker

EVENTS = Path(__file__).resolve().parents[2] / "events"
WORKERS = 4
RECEIVE_BUDGET = 100_000  # see receive_budget
TRANSIENT, PERMANENT = 0.05, 0.01
# name: (provider, limits). Two connections per mailbox against four environments: the
# semaphore is contended all the time. One mailbox is paced by its message bucket too.
MAILBOXES = {
    "m365": ("microsoft", {"max_connections": 2, "messages_per_minute": 600}),
    "gmail": ("google", {"max_connections": 2, "messages_per_minute": 6000}),
    "workspace": ("google_service_account", {"max_connections": 2, "messages_per_minute": 6000}),
    "oauth2": ("oauth2", {"max_connections": 2, "messages_per_minute": 6000}),
    "relay": ("basic", {"max_connections": 1, "messages_per_minute": 6000}),
}


class TimedSmtpServer(SandboxSmtpServer):
    """The sandbox server, also noting when it accepted each message."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.accepted_at: list[tuple[str, float]] = []

    def _accept(self, session, envelope, data):
        accepted = super()._accept(session, envelope, data)
        self.accepted_at.append((accepted.auth_user, time.monotonic()))
        return accepted


@pytest.fixture
def load(stack, aws_env, token_server, ca_trust_env, sandbox_ca, monkeypatch):
    env = stack.function_env("SenderFunction")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    gate = TokenGate(token_server)
    smtp = TimedSmtpServer(sandbox_ca, verify_token=gate).start()
    pipeline = MailPipeline(stack, env, token_server, smtp, gate, monkeypatch, lambda **_: smtp)
    pipeline.drain()
    try:
        with receive_budget(pipeline, RECEIVE_BUDGET):
            yield pipeline, {**aws_env, **ca_trust_env, **env}
    finally:
        pipeline.drain()
        smtp.stop()


@contextlib.contextmanager
def receive_budget(p: MailPipeline, receives: int) -> Iterator[None]:
    """The send queue's maxReceiveCount set to ``receives`` while the load runs, then restored.

    The workers let every delay the sender asks for pass at once, so a message waiting for a
    mailbox's connection slot is received again within milliseconds instead of seconds: its
    receive count climbs far faster than under SQS, and the template's budget would be spent in
    a few seconds of contention. What the sender does on the last receive is proven on its own
    (``test_sender_pipeline``: failed with a status record and dead-lettered)."""
    attributes = p.sqs.get_queue_attributes(QueueUrl=p.queue_url, AttributeNames=["RedrivePolicy"])
    declared = attributes["Attributes"]["RedrivePolicy"]
    policy = json.loads(declared) | {"maxReceiveCount": receives}
    p.sqs.set_queue_attributes(QueueUrl=p.queue_url, Attributes={"RedrivePolicy": json.dumps(policy)})
    try:
        yield
    finally:
        p.sqs.set_queue_attributes(QueueUrl=p.queue_url, Attributes={"RedrivePolicy": declared})


@pytest.mark.slow
def test_a_thousand_messages_with_random_faults_are_each_sent_once_or_failed_within_every_limit(load):
    run_load(*load, messages=1000, timeout=900)


def test_sixty_messages_with_random_faults_are_each_sent_once_or_failed_within_every_limit(load):
    run_load(*load, messages=60, timeout=180)


def run_load(p: MailPipeline, env: dict[str, str], *, messages: int, timeout: float) -> None:
    rng = random.Random(20261122)
    integrations = {
        name: p.add(provider, name=name, username=f"{name}@contoso.com", limits=limits)
        for name, (provider, limits) in MAILBOXES.items()
    }
    # At least one of each fault, even in the short run, at random positions.
    faulty = rng.sample(
        range(messages), max(1, round(messages * TRANSIENT)) + max(1, round(messages * PERMANENT))
    )
    permanent = set(faulty[: max(1, round(messages * PERMANENT))])
    plan: dict[str, tuple[str, str]] = {}  # message id -> (mailbox, fault)
    for n in range(messages):
        name = list(MAILBOXES)[n % len(MAILBOXES)]
        recipient = f"r{n}-{uuid.uuid4().hex[:6]}@example.com"
        fault = "permanent" if n in permanent else "transient" if n in faulty else "none"
        if fault == "transient":
            p.smtp.fail("rcpt", 451, "4.3.0 Temporary failure, try again", recipient=recipient)
        elif fault == "permanent":
            p.smtp.fail("rcpt", 550, "5.1.1 User unknown", recipient=recipient, times=1000)
        sender = {"email": f"{name}@contoso.com"}
        message = p.message(integrations[name], to=[recipient], cc=[], bcc=[], **{"from": sender})
        plan[message["id"]] = (name, fault)
        p.post(message)

    started = time.monotonic()
    workers = drive_with_workers(p, env, timeout=timeout)
    elapsed = time.monotonic() - started

    figures = account(p, plan, integrations)
    figures |= {"messages": messages, "seconds": round(elapsed, 1), "workers": workers}
    print("\nload figures:", json.dumps(figures, indent=2))
    assert figures["lost"] == [] and figures["left_on_queue"] == 0
    assert figures["duplicated"] == []
    assert figures["wrong_final_state"] == []
    assert all(n <= 1 for n in figures["tokens_issued_per_credential"].values())
    for name, (_, limits) in MAILBOXES.items():
        assert figures["peak_sessions"][name] <= limits["max_connections"], name
    assert figures["bucket_exceeded"] == []


def drive_with_workers(p: MailPipeline, env: dict[str, str], *, timeout: float) -> list[dict]:
    """Run the sender environments until the queue has been empty for a while."""
    spawn = multiprocessing.get_context("spawn")
    stop, results = spawn.Event(), spawn.Queue()
    idle = [spawn.Event() for _ in range(WORKERS)]
    queue_arn = p.stack.attribute("SendQueue", "Arn")
    workers = [
        spawn.Process(target=load_worker.run, args=(env, queue_arn, stop, idle[n], results), daemon=True)
        for n in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + timeout
    try:
        quiet_since = None
        while time.monotonic() < deadline:
            quiet = sum(p.queue_depth()) == 0 and all(e.is_set() for e in idle)
            quiet_since = (quiet_since or time.monotonic()) if quiet else None
            if quiet_since and time.monotonic() - quiet_since > 2:
                break
            threading.Event().wait(0.5)
    finally:
        stop.set()
        reports = [results.get(timeout=30) for _ in workers]
        for worker in workers:
            worker.join(timeout=10)
    return reports


def account(p: MailPipeline, plan: dict[str, tuple[str, str]], integrations: dict[str, str]) -> dict:
    """Where every message ended, and the limits as the servers saw them."""
    delivered = p.deliveries()
    letters = p.dead_letters()
    lost, duplicated, wrong, states = [], [], [], Counter()
    for message_id, (_, fault) in plan.items():
        copies = delivered[message_id_for(message_id, "contoso.com")]
        status = p.status(message_id) or {}
        state = status.get("status", "no record")
        states[state] += 1
        if copies > 1:
            duplicated.append(message_id)
        if state == "sent" and copies == 1:
            ok = fault != "permanent"
        elif state == "failed" and message_id in letters and copies == 0:
            ok = fault == "permanent" and letters[message_id]["error_code"] == "recipient_rejected"
        else:
            lost.append(message_id)
            continue
        if not ok:
            wrong.append((message_id, fault, state))
    tokens = p.tokens
    issued = {}
    for name, (provider, _) in MAILBOXES.items():
        if provider == "basic":
            continue
        if provider == "google_service_account":
            issued[name] = tokens.issued(provider=provider, subject=f"{name}@contoso.com")
        else:
            issued[name] = tokens.issued(client_id=p.client_id(integrations[name]))
    return {
        "final_states": dict(states),
        "faults_injected": dict(Counter(fault for _, fault in plan.values())),
        "lost": lost,
        "left_on_queue": sum(p.queue_depth()),
        "duplicated": duplicated,
        "wrong_final_state": wrong,
        "tokens_issued_per_credential": issued,
        "token_endpoint_requests": tokens.requests,
        "peak_sessions": {name: p.smtp.max_concurrent.get(f"{name}@contoso.com", 0) for name in MAILBOXES},
        "bucket_exceeded": bucket_exceeded(p.smtp.accepted_at),
        "smtp_connections": p.smtp.connections,
    }


def bucket_exceeded(accepted_at: list[tuple[str, float]]) -> list[tuple[str, float, int]]:
    """Windows in which a mailbox's server took more than its message bucket allows: at most
    ``burst + rate * W`` messages in any W seconds (plus one for the clocks' granularity)."""
    exceeded = []
    for name, (_, limits) in MAILBOXES.items():
        pace = Pace.of(limits["messages_per_minute"], slowed=False)
        times = sorted(t for user, t in accepted_at if user == f"{name}@contoso.com")
        for width in (1.0, 5.0, 15.0, 60.0):
            allowed = pace.burst + pace.rate * width + 1
            for i, start in enumerate(times):
                count = sum(1 for t in times[i:] if t < start + width)
                if count > allowed:
                    exceeded.append((name, width, count))
                    break
    return exceeded
