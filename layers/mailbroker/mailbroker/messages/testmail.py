"""The test mail (``POST /v1/integrations/{id}/test``, ``mailbroker test ID --to ADDR``).

A short, clearly labelled message from the integration's default sender, queued like any other:
it takes the whole path (queue, sender, token, SMTP), gets a status record, and fails with the
same codes and hints a real message would. Its id starts with ``test-`` so it is easy to find.
"""

from __future__ import annotations

import uuid
from typing import Any

TEST_HEADER = "X-Mailbroker-Test"


def build_test_mail(integration: Any, to: str) -> dict[str, Any]:
    """The message JSON of a test mail from ``integration`` to ``to``."""
    sender = integration.default_sender()
    usage = "transactional" if "transactional" in integration.usage else integration.usage[0]
    return {
        "integration": integration.id,
        "id": f"test-{integration.id}-{uuid.uuid4().hex[:12]}",
        "usage": usage,
        "from": {"email": sender.email, **({"name": sender.name} if sender.name else {})},
        "to": [to],
        "subject": f"mailbroker test message ({integration.id})",
        "text": (
            f"This is a test message from mailbroker, sent through the integration "
            f"'{integration.id}' ({integration.provider}) as {sender.email}.\n\n"
            "It went the whole way a real message goes: the send queue, the sender, the provider's "
            "token and the SMTP server. Nothing needs to be done about it.\n"
        ),
        "headers": {TEST_HEADER: "1"},
    }


def send_test_mail(queue: Any, integrations: Any, integration_id: str, to: str) -> dict[str, str]:
    """Queue a test mail; answers ``{"id", "status"}``. Raises ``UnknownIntegration`` (404) for an
    integration that does not exist and ``InvalidMessage`` (400) for a bad ``to``."""
    integration = integrations.get(integration_id)
    answer: dict[str, str] = queue.enqueue(build_test_mail(integration, to))
    return answer
