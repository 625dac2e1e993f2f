"""The HTTP transports: Microsoft Graph ``sendMail`` (``graph``) and the Gmail API
``users.messages.send`` (``gmail_api``), for integrations whose ``transport`` is not ``smtp``.

Both take the MIME message mailbroker built, so the Message-ID and bytes stay ours, and offer the
SMTP session's shape (``open``, ``send``, ``close``) to the delivery flow.
"""

from __future__ import annotations

from typing import Any

from mailbroker.transports.http import ApiSendResult, ApiSession, TokenSource


def api_session(integration: Any, tokens: TokenSource, **kwargs: Any) -> ApiSession:
    """The HTTP session for ``integration``'s transport."""
    if integration.transport == "graph":
        from mailbroker.transports.graph import GraphSession

        return GraphSession(integration, tokens, **kwargs)
    if integration.transport == "gmail_api":
        from mailbroker.transports.gmail_api import GmailApiSession

        return GmailApiSession(integration, tokens, **kwargs)
    raise ValueError(f"transport {integration.transport!r} is not an HTTP transport")


__all__ = ["ApiSendResult", "ApiSession", "TokenSource", "api_session"]
