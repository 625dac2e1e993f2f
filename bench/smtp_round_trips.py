"""Figure 2: SMTP round trips per message.

A loopback proxy (``bench.proxy``) delays every server→client write by D; K single-recipient
messages go through it to the sandbox SMTP server (STARTTLS, XOAUTH2); round trips per message =
wall time of the median message ÷ D. Measured in the same run:

* smtplib, a new connection + STARTTLS + AUTH per message (what a sender without a session does);
* smtplib reusing one authenticated connection (``sendmail`` per message);
* mailbroker's ``SmtpSession`` on a warm connection, the server offering PIPELINING;
* the same with the server also offering CHUNKING (BDAT).

Every message is checked to have arrived (the server's ``accepted`` list).
"""

from __future__ import annotations

import smtplib
import statistics
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

from bench import Row, Target
from bench.environment import environ
from bench.proxy import DelayProxy

DELAY = 0.020
PIPELINED_TARGET = 2.2
BDAT_TARGET = 1.3


def message(sender: str, recipient: str, index: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = recipient
    mail["Subject"] = f"Benchmark message {index}"
    mail["Message-ID"] = f"<bench-{index}-{time.monotonic_ns()}@contoso.example>"
    mail.set_content("Your order has shipped.\n" * 40)
    return mail.as_bytes(policy=SMTP)


def xoauth2(username: str, token: str) -> Callable[..., str]:
    def respond(challenge: bytes | None = None) -> str:
        return f"user={username}\x01auth=Bearer {token}\x01\x01" if challenge is None else ""

    return respond


def fetch_token(sandbox: Any, identity: dict[str, Any]) -> str:
    from mailbroker.integrations import parse_integration
    from mailbroker.tokens.providers import TokenProviders

    with environ(sandbox.ca.trust_env()):
        return TokenProviders().fetch(parse_integration(identity)).access_token


def smtplib_connection(host: str, port: int, username: str, token: str, context: Any) -> smtplib.SMTP:
    client = smtplib.SMTP(host, port, timeout=10)
    client.ehlo()
    client.starttls(context=context)
    client.ehlo()
    client.auth("XOAUTH2", xoauth2(username, token), initial_response_ok=True)
    return client


# The nested helpers share this run's servers, token and message stream; each is simple on its own.
def run(sandbox: Any, *, smoke: bool) -> list[Row]:  # noqa: C901
    k = 4 if smoke else 40
    plain = sandbox.smtp_server(pipelining=True, chunking=False)
    chunking = sandbox.smtp_server(pipelining=True, chunking=True)
    identity = sandbox.microsoft_identity("round-trips", plain)
    chunking.add_mailbox(identity["username"], allowed_clients=[identity["client_id"]])
    token = fetch_token(sandbox, identity)
    username = identity["username"]
    recipient = "ana@example.com"
    context = sandbox.ca.client_context()
    mails = iter([message(username, recipient, i) for i in range(8 * k)])

    def timed(
        server: Any, send: Callable[[Any], None], opener: Any = None, delay: float = DELAY
    ) -> list[float]:
        """Seconds each of K messages took through a fresh proxy in front of ``server``."""
        with DelayProxy(("127.0.0.1", server.port), delay) as proxy:
            before = len(server.accepted)
            held = opener(proxy) if opener else proxy
            took = []
            for _ in range(k):
                started = time.perf_counter()
                send(held)
                took.append(time.perf_counter() - started)
            if isinstance(held, smtplib.SMTP):
                held.quit()
            elif opener is not None:
                held.close()
        arrived = len(server.accepted) - before
        if arrived != k:
            raise RuntimeError(f"{arrived} of {k} messages arrived")
        return took

    def new_connection_each(proxy: DelayProxy) -> None:
        client = smtplib_connection(proxy.host, proxy.port, username, token, context)
        client.sendmail(username, [recipient], next(mails))
        client.quit()

    def smtplib_reused(client: smtplib.SMTP) -> None:
        client.sendmail(username, [recipient], next(mails))

    session_results: list[Any] = []

    def mailbroker_session(proxy: DelayProxy) -> Any:
        from mailbroker.integrations import SmtpEndpoint
        from mailbroker.smtp.transport import SmtpSession
        from mailbroker.smtp.xoauth2 import XOAuth2Auth

        session = SmtpSession(
            SmtpEndpoint(host="127.0.0.1", port=proxy.port, security="starttls"),
            username=username,
            auth=XOAuth2Auth(lambda fresh: token),
            ssl_context=context,
        )
        session.open()
        return session

    def mailbroker_send(session: Any) -> None:
        session_results.append(session.send(username, [recipient], next(mails)))

    def reused_smtplib(proxy: DelayProxy) -> smtplib.SMTP:
        return smtplib_connection(proxy.host, proxy.port, username, token, context)

    variants = {
        "new_connection": (plain, new_connection_each, None),
        "smtplib_reused": (plain, smtplib_reused, reused_smtplib),
        "pipelined": (plain, mailbroker_send, mailbroker_session),
        "bdat": (chunking, mailbroker_send, mailbroker_session),
    }
    samples, writes, floor = {}, {}, {}
    for name, (server, send, opener) in variants.items():
        session_results.clear()
        samples[name] = timed(server, send, opener)
        writes[name] = max((r.round_trips for r in session_results), default=None)
        # The same messages without delay: what processing alone costs per message.
        floor[name] = statistics.median(timed(server, send, opener, delay=0.0))
    # The median message: a scheduler hiccup on a shared machine moves the mean, not the median.
    trips = {name: statistics.median(took) / DELAY for name, took in samples.items()}
    details = {
        "delay_ms": DELAY * 1000,
        "messages": k,
        "median_ms": {name: round(statistics.median(t) * 1000, 2) for name, t in samples.items()},
        "mean_ms": {name: round(statistics.fmean(t) * 1000, 2) for name, t in samples.items()},
        "undelayed_median_ms": {name: round(f * 1000, 2) for name, f in floor.items()},
        # (median with delay - median without) / D: round trips net of processing time
        "net_round_trips": {
            name: round((statistics.median(t) - floor[name]) / DELAY, 2) for name, t in samples.items()
        },
        "session_writes_per_message": {name: n for name, n in writes.items() if n is not None},
    }
    return [
        Row(
            "SMTP round trips per message, pipelined",
            trips["pipelined"],
            trips["smtplib_reused"],
            baseline_label="smtplib, one connection",
            target=Target(PIPELINED_TARGET),
            details=details,
        ),
        Row(
            "SMTP round trips per message, pipelined",
            trips["pipelined"],
            trips["new_connection"],
            baseline_label="smtplib, connection + AUTH per message",
            target=Target(PIPELINED_TARGET),
            details=details,
        ),
        Row(
            "SMTP round trips per message, BDAT",
            trips["bdat"],
            trips["smtplib_reused"],
            baseline_label="smtplib, one connection",
            target=Target(BDAT_TARGET),
            details=details,
        ),
    ]
