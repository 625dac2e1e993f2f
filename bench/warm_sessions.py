"""Figure 7: SMTP round trips per message of a whole batch, the first one of an execution
environment and the next one in the same environment.

The sender's own session pool (``mailbroker.messages.sessions``: the batch's ``SessionPool``, the
environment's ``IdleSessions`` with the default ``SMTP_IDLE_SECONDS``, tokens from the token
broker as the sender builds it) sends batches of ten single-recipient messages through the delay
proxy of figure 2 (every server→client write delayed by D = 100 ms) to the sandbox SMTP server.

* first batch: from nothing open, so connect, EHLO, STARTTLS, TLS, EHLO and AUTH count, then the
  ten transactions; the batch ends as the sender's does (the session is parked);
* second batch, 2 s later, in the same environment: the parked session is taken back (its first
  transaction carries the RSET probe), once against a server offering PIPELINING only and once
  against one offering CHUNKING too.

Round trips per message = (the batch's wall time with the delay minus the same batch's without
it) ÷ D ÷ 10: the waits the protocol exchange costs, net of processing, which on a shared machine
can weigh more than the network (the gross wall time ÷ D is in the details). Baseline, through
the same proxy: what a sender without a kept session does for each batch, smtplib with one
connection (connect, STARTTLS, AUTH) for the batch and ``sendmail`` per message. No governor:
the connection slot is DynamoDB bookkeeping, counted in figure 3. Every message is checked to
have arrived.
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any

from bench import Row, Target
from bench.environment import environ
from bench.proxy import DelayProxy
from bench.smtp_round_trips import fetch_token, message, smtplib_connection

# A round trip to a provider's server from a Lambda region is tens of milliseconds; 100 ms keeps
# the figure about the network when a shared machine makes each step slow.
DELAY = 0.100
BATCH = 10
PAUSE = 2.0
FIRST_TARGET = 3.0
PIPELINED_TARGET = 2.2
BDAT_TARGET = 1.3


def run(sandbox: Any, *, smoke: bool) -> list[Row]:
    chunking = sandbox.smtp_server(pipelining=True, chunking=True)
    plain = sandbox.smtp_server(pipelining=True, chunking=False)
    identity = sandbox.microsoft_identity("warm", chunking)
    plain.add_mailbox(identity["username"], allowed_clients=[identity["client_id"]])
    token = fetch_token(sandbox, identity)
    counter = iter(range(10**6))

    def mails() -> list[bytes]:
        return [message(identity["username"], "ana@example.com", next(counter)) for _ in range(BATCH)]

    with environ(sandbox.function_env("SenderFunction")), contextlib.redirect_stdout(io.StringIO()):
        from mailbroker.settings import SenderSettings, get_settings

        idle_seconds = get_settings(SenderSettings).smtp_idle_seconds
        sender = _Sender(sandbox, identity, idle_seconds, mails)
        first, second_bdat = sender.two_batches(chunking)
        connections_before = plain.connections
        _, second_pipelined = sender.two_batches(plain)
        if plain.connections - connections_before != 1:
            raise RuntimeError("the second batch opened a new connection")
        # The same without delay: what processing alone costs (large on a shared machine).
        first_0, second_bdat_0 = sender.two_batches(chunking, 0.0)
        _, second_pipelined_0 = sender.two_batches(plain, 0.0)

    context = sandbox.ca.client_context()

    def smtplib_batch(server: Any, delay: float = DELAY) -> float:
        with DelayProxy(("127.0.0.1", server.port), delay) as proxy:
            before = len(server.accepted)
            started = time.perf_counter()
            client = smtplib_connection(proxy.host, proxy.port, identity["username"], token, context)
            for data in mails():
                client.sendmail(identity["username"], ["ana@example.com"], data)
            client.quit()
            took = time.perf_counter() - started
            _arrived(server, before)
        return took

    baseline, baseline_0 = smtplib_batch(chunking), smtplib_batch(chunking, 0.0)
    delayed = {
        "first_batch": (first, first_0),
        "second_batch_pipelining": (second_pipelined, second_pipelined_0),
        "second_batch_chunking": (second_bdat, second_bdat_0),
        "smtplib_batch": (baseline, baseline_0),
    }
    return _rows(delayed, idle_seconds)


class _Sender:
    """The sender's own session pool in one execution environment, batch after batch."""

    def __init__(self, sandbox: Any, identity: dict[str, Any], idle_seconds: float, mails: Any) -> None:
        from mailbroker import runtime

        self.sandbox = sandbox
        self.identity = identity
        self.idle_seconds = idle_seconds
        self.mails = mails
        self.broker = runtime.token_broker()
        self.store = runtime.integration_store()
        self.context = sandbox.ca.client_context()

    def two_batches(self, server: Any, delay: float = DELAY) -> tuple[float, float]:
        """Seconds of a first batch and of a second one PAUSE later, in the same environment."""
        from mailbroker.integrations import parse_integration
        from mailbroker.messages.sessions import IdleSessions

        with DelayProxy(("127.0.0.1", server.port), delay) as proxy:
            integration = parse_integration(
                self.identity | {"smtp": {"host": "127.0.0.1", "port": proxy.port, "security": "starttls"}}
            )
            self.store.put(integration)
            self.broker.token_for(integration.id)  # tokens warm: the figure is SMTP's
            environment = IdleSessions(self.idle_seconds)
            took = []
            for n in range(2):
                if n:
                    time.sleep(PAUSE)
                took.append(self._batch(server, integration, environment))
            reused = len(environment)
            for entry in environment.drop_all():
                entry.session.close()
            if reused != 1:
                raise RuntimeError("the session was not kept between the batches")
        return took[0], took[1]

    def _batch(self, server: Any, integration: Any, environment: Any) -> float:
        from mailbroker.messages.sessions import SessionPool

        before = len(server.accepted)
        pool = SessionPool(self.broker, idle=environment, ssl_context=self.context)
        started = time.perf_counter()
        for data in self.mails():
            pool.session_for(integration).send(self.identity["username"], ["ana@example.com"], data)
        pool.close_all()
        took = time.perf_counter() - started
        _arrived(server, before)
        return took


def _rows(delayed: dict[str, tuple[float, float]], idle_seconds: float) -> list[Row]:
    # Round trips: the time the delay added, in delays (processing, measured without delay,
    # taken out); the gross figure (wall time ÷ D) is in the details.
    trips = {name: max(0.0, d - u) / DELAY / BATCH for name, (d, u) in delayed.items()}
    details = {
        "delay_ms": DELAY * 1000,
        "batch": BATCH,
        "pause_s": PAUSE,
        "idle_seconds": idle_seconds,
        "net_round_trips_per_message": {name: round(value, 2) for name, value in trips.items()},
        "gross_round_trips_per_message": {n: round(d / DELAY / BATCH, 2) for n, (d, _) in delayed.items()},
        "undelayed_ms_per_message": {name: round(u * 1000 / BATCH, 1) for name, (_, u) in delayed.items()},
    }
    label = "smtplib, a connection + AUTH per batch"
    return [
        Row(
            f"SMTP round trips per message, first batch of {BATCH} (connect, TLS, AUTH included)",
            trips["first_batch"],
            trips["smtplib_batch"],
            baseline_label=label,
            target=Target(FIRST_TARGET),
            details=details,
        ),
        Row(
            f"SMTP round trips per message, next batch {PAUSE:g} s later, kept session, PIPELINING",
            trips["second_batch_pipelining"],
            trips["smtplib_batch"],
            baseline_label=label,
            target=Target(PIPELINED_TARGET),
            details=details,
        ),
        Row(
            f"SMTP round trips per message, next batch {PAUSE:g} s later, kept session, CHUNKING",
            trips["second_batch_chunking"],
            trips["smtplib_batch"],
            baseline_label=label,
            target=Target(BDAT_TARGET),
            details=details,
        ),
    ]


def _arrived(server: Any, before: int) -> None:
    arrived = len(server.accepted) - before
    if arrived != BATCH:
        raise RuntimeError(f"{arrived} of {BATCH} messages arrived")
