"""Figure 10: building a message with many long non-ASCII display names, CPU time.

The message: N recipients (N = 150; 20 with ``--smoke``) whose 150-character display names
alternate ``é`` and a space — the shape that stalled a sender while the ``email`` package folded
its address headers (one such name cost about 80 ms). mailbroker: ``build_mime(...).as_bytes()``
(address headers folded by ``messages/address_header.py``). Baseline, in the same run: the same
headers set through the ``email`` package's own address folding (``headerregistry.Address``), the
way ``build_mime`` wrote them before. CPU time (``time.process_time``), best of 3. Target: ratio at
most 0.1.
"""

from __future__ import annotations

import time
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from bench import Row, Target

NAME = ("é " * 100)[:150]


def _message(recipients: int) -> Any:
    from mailbroker.messages.models import parse_message

    return parse_message(
        {
            "integration": "bench",
            "id": "bench-mime",
            "from": {"email": "support@contoso.com", "name": NAME},
            "to": [{"email": f"r{i:03d}@example.com", "name": NAME} for i in range(recipients)],
            "subject": "Benchmark",
            "text": "Hello.",
        }
    )


def _mailbroker(message: Any) -> bytes:
    from mailbroker.messages.mime import build_mime

    return build_mime(message, message_id_domain="contoso.com").as_bytes()


def _stdlib(message: Any) -> bytes:
    root = EmailMessage(policy=policy.SMTP)
    for name, addresses in (("From", [message.from_]), ("To", message.to)):
        root[name] = [Address(a.name or "", a.local_part, a.domain) for a in addresses]
    root["Subject"] = message.subject
    root.set_content(message.text)
    return root.as_bytes()


def _best(build: Any, message: Any, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        build(message)
        times.append(time.process_time() - started)
    return min(times)


def run(sandbox: Any, *, smoke: bool) -> list[Row]:
    recipients = 20 if smoke else 150
    message = _message(recipients)
    mailbroker, baseline = _best(_mailbroker, message), _best(_stdlib, message)
    return [
        Row(
            f"MIME build, {recipients} long non-ASCII names",
            round(mailbroker * 1000, 2),
            round(baseline * 1000, 2),
            unit="ms CPU",
            baseline_label="email package folding",
            target=Target(0.1, on="ratio"),
            details={"recipients": recipients, "name_chars": len(NAME)},
        )
    ]
