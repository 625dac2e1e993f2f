"""Figure 7: HTTP requests per message and TLS handshakes per batch, for the ``graph`` and
``gmail_api`` transports beside ``smtp``, in the same run.

Ten messages per transport are queued as ``POST /v1/messages`` queues them (a ``queued`` status
record each, then the send queue on moto); one SQS batch of ten is handed to the sender function's
handler, which sends them to the sandbox SMTP server or to the sandbox Graph and
Gmail API stand-ins (HTTPS). The servers count the TLS handshakes they completed and the HTTP
requests they answered. Baselines, counted by the same servers: the same ten messages posted the
usual way with ``requests.post`` (a new connection per message), and for SMTP smtplib with a
connection per message. Every STARTTLS or HTTPS connection is one TLS handshake.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import requests

from bench import Row, Target
from bench.connections import _deliver_queued
from bench.environment import environ, outgoing

BATCH = 10
LIMITS = {"messages_per_minute": 10_000, "max_connections": 10}


def run(sandbox: Any, *, smoke: bool) -> list[Row]:
    apis = sandbox.mail_api_server()
    smtp = sandbox.smtp_server(pipelining=True, chunking=True)
    run_id = uuid.uuid4().hex[:8]
    identities = {
        "smtp": sandbox.microsoft_identity(f"smtp-{run_id}", smtp) | {"limits": LIMITS},
        "graph": _graph_identity(sandbox, apis, f"graph-{run_id}"),
        "gmail_api": _gmail_identity(sandbox, apis, f"gmail-{run_id}"),
    }
    measured = {
        transport: _batch(sandbox, identity, apis, smtp) for transport, identity in identities.items()
    }
    baseline = {
        transport: _requests_per_message(sandbox, identities[transport], apis)
        for transport in ("graph", "gmail_api")
    }

    details = {"batch": BATCH, "mailbroker": measured, "requests.post": baseline}
    details["smtplib"] = _smtplib_per_message(sandbox, identities["smtp"], smtp)
    rows = [
        Row(
            f"smtp: TLS handshakes per batch of {BATCH}",
            measured["smtp"]["handshakes"],
            details["smtplib"]["handshakes"],
            baseline_label="smtplib per message",
            target=Target(1),
            details=details,
        )
    ]
    for transport, label in (("graph", "Graph sendMail"), ("gmail_api", "Gmail API")):
        mine, theirs = measured[transport], baseline[transport]
        rows += [
            Row(
                f"{transport}: TLS handshakes per batch of {BATCH}",
                mine["handshakes"],
                theirs["handshakes"],
                baseline_label="requests.post per message",
                target=Target(1),
                details=details,
            ),
            Row(
                f"{transport}: HTTP requests per message ({label})",
                mine["requests"] / BATCH,
                theirs["requests"] / BATCH,
                baseline_label="requests.post per message",
                target=Target(1),
                details=details,
            ),
        ]
    return rows


def _graph_identity(sandbox: Any, apis: Any, name: str) -> dict[str, Any]:
    mailbox = f"{name}@contoso.example"
    sandbox.tokens.register_microsoft_app("bench-tenant", f"app-{name}", f"bench-secret-{name}")
    apis.add_mailbox(mailbox, graph_clients=[f"app-{name}"])
    return {
        "id": name,
        "provider": "microsoft",
        "transport": "graph",
        "graph_endpoint": apis.base_url,
        "username": mailbox,
        "senders": [{"email": mailbox}],
        "tenant_id": "bench-tenant",
        "client_id": f"app-{name}",
        "client_secret": f"bench-secret-{name}",
        "authority": sandbox.tokens.base_url,
        "limits": LIMITS,
    }


def _gmail_identity(sandbox: Any, apis: Any, name: str) -> dict[str, Any]:
    mailbox = f"{name}@fabrikam.example"
    client_id, secret = f"client-{name}", f"bench-secret-{name}"
    sandbox.tokens.register_google_client(client_id, secret)
    apis.add_mailbox(mailbox)
    return {
        "id": name,
        "provider": "google",
        "transport": "gmail_api",
        "gmail_endpoint": apis.base_url,
        "username": mailbox,
        "senders": [{"email": mailbox}],
        "client_id": client_id,
        "client_secret": secret,
        "refresh_token": sandbox.tokens.issue_refresh_token(client_id, mailbox),
        "token_uri": sandbox.tokens.google_token_uri,
        "limits": LIMITS,
    }


def _counters(apis: Any, smtp: Any) -> dict[str, int]:
    return {
        "api_handshakes": apis.connections,
        "api_requests": apis.requests,
        "api_accepted": len(apis.received),
        "smtp_handshakes": smtp.connections,
        "smtp_accepted": len(smtp.accepted),
    }


def _batch(sandbox: Any, identity: dict[str, Any], apis: Any, smtp: Any) -> dict[str, int]:
    """One SQS batch of ten through the sender handler; what the server counted."""
    from mailbroker import runtime
    from mailbroker.integrations import parse_integration

    messages = [outgoing(identity, f"{identity['id']}-{i}") for i in range(BATCH)]
    with environ(sandbox.function_env("SenderFunction")):
        runtime.integration_store().put(parse_integration(identity))
        before = _counters(apis, smtp)
        answers, _ = _deliver_queued(sandbox, identity, messages, per_invocation=BATCH)
        after = _counters(apis, smtp)
    delta = {name: after[name] - before[name] for name in after}
    prefix = "smtp" if identity.get("transport", "smtp") == "smtp" else "api"
    failures = [f for answer in answers for f in answer.get("batchItemFailures", [])]
    delivered = delta[f"{prefix}_accepted"]
    if failures or delivered != BATCH:
        raise RuntimeError(f"{identity['id']}: {delivered} of {BATCH} delivered: {failures}")
    return {
        "handshakes": delta[f"{prefix}_handshakes"],
        "requests": delta["api_requests"] if prefix == "api" else 0,
        "delivered": delivered,
    }


def _requests_per_message(sandbox: Any, identity: dict[str, Any], apis: Any) -> dict[str, int]:
    """The baseline: each message posted with its own ``requests.post`` (a connection each)."""
    from mailbroker.integrations import parse_integration
    from mailbroker.tokens.providers import TokenProviders

    with environ(sandbox.ca.trust_env()):
        integration = parse_integration(identity)
        token = TokenProviders().fetch(integration).access_token
        before = (apis.connections, apis.requests)
        for i in range(BATCH):
            head = f"From: {identity['username']}\r\nTo: ana@example.com\r\nSubject: {i}\r\n"
            data = f"{head}\r\nhello\r\n".encode()
            if identity["transport"] == "graph":
                url = f"{apis.base_url}/v1.0/users/{identity['username']}/sendMail"
                body, kind = base64.b64encode(data), "text/plain"
            else:
                url = f"{apis.base_url}/upload/gmail/v1/users/me/messages/send?uploadType=media"
                body, kind = data, "message/rfc822"
            answer = requests.post(
                url, data=body, headers={"Authorization": f"Bearer {token}", "Content-Type": kind}, timeout=10
            )
            answer.raise_for_status()
        after = (apis.connections, apis.requests)
    return {"handshakes": after[0] - before[0], "requests": after[1] - before[1]}


def _smtplib_per_message(sandbox: Any, identity: dict[str, Any], smtp: Any) -> dict[str, int]:
    """The SMTP baseline: smtplib with a connection (STARTTLS, AUTH) per message."""
    from bench.smtp_round_trips import fetch_token, smtplib_connection

    token = fetch_token(sandbox, identity)
    context = sandbox.ca.client_context()
    before = smtp.connections
    for i in range(BATCH):
        client = smtplib_connection("127.0.0.1", smtp.port, identity["username"], token, context)
        client.sendmail(identity["username"], ["ana@example.com"], f"Subject: {i}\r\n\r\nhello\r\n")
        client.quit()
    return {"handshakes": smtp.connections - before}
