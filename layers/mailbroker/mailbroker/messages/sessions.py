"""The SMTP sessions of one batch: one authenticated session per integration, opened on first
use and reused by the batch's other messages of that integration, then closed with the batch.

Opening a session takes a connection slot from the send governor (when there is one) and, for
OAuth integrations, a token from the broker (:class:`BrokerTokens`). A session that could not be
opened is remembered for the batch, and a throttled integration is held off, so the rest of the
batch does not ask the token endpoint or the server again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from mailbroker.errors import MailbrokerError
from mailbroker.integrations import BasicIntegration
from mailbroker.messages.received import SLOWS_DOWN, Deferred
from mailbroker.observability import integration_metric, logger

if TYPE_CHECKING:
    import ssl

    from mailbroker.governor import ConnectionSlot
    from mailbroker.integrations import Integration
    from mailbroker.seams import Governor, MailSession, SessionFactory, TokenSource
    from mailbroker.smtp.xoauth2 import Authenticator

# A claimed id or connection slot whose sender shows no sign of life for this long is taken for
# dead. Longer than the sender function's timeout, so a live sender never loses its claim.
DEFAULT_LEASE_SECONDS = 300.0


class BrokerTokens:
    """The XOAUTH2 token provider of one integration's session: tokens from the broker; when a
    server refused one (``force_refresh=True``), the broker is told which, so it is never handed
    out again."""

    def __init__(self, broker: TokenSource, integration_id: str) -> None:
        self._broker = broker
        self._integration_id = integration_id
        self._last: str | None = None

    def __repr__(self) -> str:
        return f"BrokerTokens({self._integration_id!r})"

    def __call__(self, force_refresh: bool = False) -> str:
        token = self._broker.token_for(
            self._integration_id,
            force_refresh=force_refresh,
            rejected_token=self._last if force_refresh else None,
        )
        self._last = token.access_token
        integration_metric("TokenSource", self._integration_id, 1, source=token.source)
        return token.access_token


@dataclass
class _Open:
    session: MailSession
    slot: ConnectionSlot | None = None


class SessionPool:
    """One authenticated SMTP session per integration for the batch, opened on first use.

    A failure to open is remembered for the batch: the other messages of that integration get
    the same error without asking the token endpoint or the server again. After a throttling
    reply, the integration's other messages are put back without an attempt.
    """

    def __init__(
        self,
        token_broker: TokenSource,
        *,
        governor: Governor | None = None,
        holder: str = "",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        session_factory: SessionFactory | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._broker = token_broker
        self._governor = governor
        self._holder = holder
        self._lease_seconds = lease_seconds
        self._factory = session_factory
        self._ssl_context = ssl_context
        self._clock = clock
        self._open: dict[str, _Open] = {}
        self._broken: dict[str, MailbrokerError] = {}
        self._held_until: dict[str, tuple[float, str]] = {}

    def session_for(self, integration: Integration) -> MailSession:
        held = self._held_until.get(integration.id)
        if held and held[0] > self._clock():
            raise Deferred(held[0] - self._clock(), held[1], code="throttled")
        if integration.id in self._broken:
            raise self._broken[integration.id]
        entry = self._open.get(integration.id)
        if entry is not None:
            return entry.session
        slot = None
        if self._governor is not None:
            slot = self._governor.open_connection(
                integration.id,
                integration.effective_limits(),
                holder=self._holder,
                lease_seconds=self._lease_seconds,
            )
        session = self._new_session(integration)
        try:
            session.open()
        except BaseException as exc:
            self._release(slot)
            if isinstance(exc, MailbrokerError):
                if exc.code in SLOWS_DOWN:
                    self.hold_off(integration.id, exc)
                elif exc.code != "aws_unavailable":
                    self._broken[integration.id] = exc
            raise
        self._open[integration.id] = _Open(session, slot)
        return session

    def hold_off(self, integration_id: str, error: MailbrokerError) -> None:
        """After a throttling reply: the integration's other messages in this batch wait."""
        seconds = max(error.retry_after or 0.0, 60.0)
        self._held_until[integration_id] = (self._clock() + seconds, f"{integration_id} is throttled")

    def discard(self, integration_id: str) -> None:
        entry = self._open.pop(integration_id, None)
        if entry is not None:
            self._close(entry)

    def close_all(self) -> None:
        for integration_id in list(self._open):
            self.discard(integration_id)

    def connections(self) -> int:
        return len(self._open)

    def _new_session(self, integration: Integration) -> MailSession:
        from mailbroker.smtp.transport import SmtpSession
        from mailbroker.smtp.xoauth2 import BasicAuth, XOAuth2Auth

        if integration.transport != "smtp":
            from mailbroker.transports import api_session

            # An HTTP session's result has the SMTP result's shape (reply, accepted, refused),
            # its reply being the API's answer as text.
            return cast("MailSession", api_session(integration, BrokerTokens(self._broker, integration.id)))
        if isinstance(integration, BasicIntegration):
            auth: Authenticator = BasicAuth(integration.password)
        else:
            auth = XOAuth2Auth(BrokerTokens(self._broker, integration.id))
        factory: SessionFactory = self._factory or SmtpSession
        return factory(
            integration.smtp, username=integration.username, auth=auth, ssl_context=self._ssl_context
        )

    def _close(self, entry: _Open) -> None:
        try:
            entry.session.close()
        except Exception as exc:
            logger.debug("closing an SMTP session failed", extra={"why": type(exc).__name__})
        self._release(entry.slot)

    def _release(self, slot: ConnectionSlot | None) -> None:
        if slot is None or self._governor is None:
            return
        try:
            self._governor.release_connection(slot)
        except MailbrokerError as exc:
            # The slot's lease expires by itself.
            logger.warning("could not release a connection slot", extra={"why": exc.code})
        except Exception:
            logger.exception("could not release a connection slot")
