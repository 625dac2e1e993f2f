"""The live SMTP check behind ``POST /v1/integrations/{id}/check`` and ``mailbroker doctor``:
connect, TLS, EHLO (is the AUTH mechanism offered?), AUTH, QUIT — no mail is sent."""

from __future__ import annotations

import ssl

from mailbroker.integrations import SmtpEndpoint
from mailbroker.smtp.transport import CheckStep, SmtpSession
from mailbroker.smtp.xoauth2 import Authenticator

__all__ = ["CheckStep", "run_check"]


def run_check(
    endpoint: SmtpEndpoint,
    username: str,
    auth: Authenticator,
    ssl_context: ssl.SSLContext | None = None,
    *,
    local_hostname: str | None = None,
) -> list[CheckStep]:
    """Each step's outcome, in order, ending at the first failure (whose ``code`` and ``hint``
    say what to fix)."""
    session = SmtpSession(
        endpoint, username=username, auth=auth, ssl_context=ssl_context, local_hostname=local_hostname
    )
    return session.check()
