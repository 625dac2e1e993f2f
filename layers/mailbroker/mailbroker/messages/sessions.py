"""The sessions of one batch: one authenticated session per integration, opened on first use
and reused by the batch's other messages of that integration.

Opening a session takes a connection slot from the send governor (when there is one) and, for
OAuth integrations, a token from the broker (:class:`BrokerTokens`). A session that could not be
opened is remembered for the batch, and a throttled integration is held off, so the rest of the
batch does not ask the token endpoint or the server again.

At the end of a batch a healthy SMTP session is not closed: it is parked in the execution
environment (:class:`IdleSessions`) and reused by the environment's invocations for
``SMTP_IDLE_SECONDS`` (240 s by default, under Exchange Online's and Gmail's idle timeouts). Its
connection slot stays leased while the connection may be open: Lambda can freeze an environment
with the session open, and then only the server's idle timeout closes it, so the lease is
:data:`SERVER_IDLE_SECONDS` from the session's last command. The per-mailbox connection limit
therefore counts every connection the server may still hold. An idle session gives its slot up
sooner when it can: a sender refused a slot marks the integration wanted, and a batch that ends
while it is wanted closes its session instead of parking it; an environment that wakes past the
idle time closes its stale sessions and releases their slots. The environment's next invocation
takes a parked session back without a write while its lease still outlasts the invocation (a live
slot is nobody else's); otherwise it renews the lease with one conditional write, which also
proves the slot is still this session's (if not, the session is closed and a new one opened).
Parking renews the lease with a few seconds to spare (:data:`PARK_RENEWAL_SLACK_SECONDS`), so a
session parked again within them, as a busy environment's is after each batch, costs no write; a
waiting sender is then noticed at the next renewal, a few seconds later.
Its first transaction starts with an RSET pipelined with MAIL (the transport's reuse probe); a
session the server closed meanwhile is reconnected before MAIL, so it never costs a message. A
session is not taken back past its idle time, when the integration's transport, server, account
or password changed, or when the token it authenticated with expires within a minute: a session
is never re-authenticated (servers refuse a second AUTH), it is replaced.
"""

from __future__ import annotations

import hashlib
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
        self.expires_at: float | None = None  # of the last token handed out

    def __repr__(self) -> str:
        return f"BrokerTokens({self._integration_id!r})"

    def __call__(self, force_refresh: bool = False) -> str:
        token = self._broker.token_for(
            self._integration_id,
            force_refresh=force_refresh,
            rejected_token=self._last if force_refresh else None,
        )
        self._last = token.access_token
        self.expires_at = token.expires_at
        integration_metric("TokenSource", self._integration_id, 1, source=token.source)
        return token.access_token


# A parked session is not taken back when its token expires within this margin: the server may
# end an authenticated session when its token expires, and a send must not meet that.
TOKEN_MARGIN_SECONDS = 60.0
# How long a server may keep open a connection its client stopped using: Exchange Online's idle
# timeout, about 10 minutes, the longest of the providers' (RFC 5321 asks servers for at least 5).
# A parked session's slot stays leased that long (and a margin): Lambda may freeze the
# environment with the session open, and then only the server can close it.
SERVER_IDLE_SECONDS = 600.0
IDLE_LEASE_MARGIN_SECONDS = 5.0


# A parked session's lease is renewed with this much to spare, so a session parked again within
# that time needs no write: its lease still covers the server's idle timeout from now. The price:
# a sender waiting for the slot (``wanted``) is noticed at the next renewal, up to this much later,
# about as long as a refused sender waits before asking again anyway.
PARK_RENEWAL_SLACK_SECONDS = 5.0
_IDLE_COVER_SECONDS = SERVER_IDLE_SECONDS + IDLE_LEASE_MARGIN_SECONDS
_PARKED_LEASE_SECONDS = _IDLE_COVER_SECONDS + PARK_RENEWAL_SLACK_SECONDS


@dataclass
class _Open:
    session: MailSession
    slot: ConnectionSlot | None = None
    tokens: BrokerTokens | None = None  # the XOAUTH2 tokens the session authenticated with
    fingerprint: tuple[str, ...] = ()  # what it was opened for; () for a session never parked
    parked_at: float = 0.0

    def is_open(self) -> bool:
        return bool(getattr(self.session, "is_open", False))

    def token_expires_by(self, moment: float) -> bool:
        expires = self.tokens.expires_at if self.tokens is not None else None
        return expires is not None and expires - TOKEN_MARGIN_SECONDS <= moment


def _fingerprint(integration: Integration) -> tuple[str, ...]:
    """What an SMTP session was opened for: the same server, account and credential, or a new
    session. Empty for HTTP transports, whose sessions are not kept between invocations."""
    if integration.transport != "smtp":
        return ()
    secret = integration.password.get_secret_value() if isinstance(integration, BasicIntegration) else ""
    return (
        integration.provider,
        integration.smtp.model_dump_json(),
        integration.username,
        hashlib.sha256(secret.encode()).hexdigest(),
    )


class IdleSessions:
    """Authenticated SMTP sessions kept in the execution environment between invocations, one
    per integration, each for at most ``idle_seconds`` (0: none kept)."""

    def __init__(self, idle_seconds: float = 0.0, *, clock: Callable[[], float] = time.time) -> None:
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._parked: dict[str, _Open] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, integration_id: str, entry: _Open) -> None:
        entry.parked_at = self._clock()
        self._parked[integration_id] = entry

    def take(self, integration: Integration) -> tuple[_Open | None, list[_Open]]:
        """The parked session for ``integration`` if it may be used again, and every parked
        session that may not (past its idle time, another server, account or credential, a
        token about to expire, a connection already closed): the caller closes those and
        releases their slots."""
        now = self._clock()
        stale = [
            self._parked.pop(key)
            for key, entry in list(self._parked.items())
            if now - entry.parked_at >= self.idle_seconds
        ]
        entry = self._parked.pop(integration.id, None)
        if entry is None:
            return None, stale
        usable = entry.fingerprint == _fingerprint(integration) and entry.is_open()
        if not usable or entry.token_expires_by(now):
            return None, [*stale, entry]
        return entry, stale

    def drop_all(self) -> list[_Open]:
        parked, self._parked = list(self._parked.values()), {}
        return parked


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
        idle: IdleSessions | None = None,
    ) -> None:
        self._idle = idle if idle is not None and idle.idle_seconds > 0 else None
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
        entry = self._open.get(integration.id) or self._take_parked(integration)
        if entry is not None:
            self._open[integration.id] = entry
            return entry.session
        slot = None
        if self._governor is not None:
            slot = self._governor.open_connection(
                integration.id,
                integration.effective_limits(),
                holder=self._holder,
                lease_seconds=self._lease_seconds,
            )
        session, tokens = self._new_session(integration)
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
        self._open[integration.id] = _Open(session, slot, tokens, _fingerprint(integration))
        return session

    def _take_parked(self, integration: Integration) -> _Open | None:
        """This environment's parked session for the integration, its slot leased for at least
        this invocation; None when there is none to take back."""
        if self._idle is None:
            return None
        entry, stale = self._idle.take(integration)
        for old in stale:
            self._close(old)
        if entry is None:
            return None
        if not self._leased_for_invocation(entry) and not self._renew(entry, self._lease_seconds):
            return None
        integration_metric("SmtpSessionReused", integration.id, 1)
        return entry

    def _leased_for_invocation(self, entry: _Open) -> bool:
        """Whether the parked lease still outlasts this invocation's (it usually does: it runs to
        the server's idle timeout). A live slot is nobody else's, so renewing it then would
        prove nothing and cost a write; the batch's end renews it when it parks the session."""
        slot = entry.slot
        return slot is not None and slot.expires_at - self._clock() >= self._lease_seconds

    def _renew(self, entry: _Open, lease_seconds: float, *, parking: bool = False) -> bool:
        """Move the session's slot lease to ``lease_seconds`` from now. False (the session
        closed, its slot given up) when the lease had lapsed, since the slot may be someone
        else's now; when ``parking`` and another sender is waiting for a slot; or when the
        governor could not be written."""
        if entry.slot is None or self._governor is None:
            return True
        try:
            renewed = self._governor.renew_connection(
                entry.slot, lease_seconds=lease_seconds, unless_wanted=parking
            )
        except Exception as exc:
            logger.warning("could not renew an idle session's connection slot", extra={"why": str(exc)})
            renewed = None
        if renewed is None:
            self._close(entry)
            return False
        entry.slot = renewed
        return True

    def hold_off(self, integration_id: str, error: MailbrokerError) -> None:
        """After a throttling reply: the integration's other messages in this batch wait."""
        seconds = max(error.retry_after or 0.0, 60.0)
        self._held_until[integration_id] = (self._clock() + seconds, f"{integration_id} is throttled")

    def discard(self, integration_id: str) -> None:
        entry = self._open.pop(integration_id, None)
        if entry is not None:
            self._close(entry)

    def close_all(self) -> None:
        """End of the batch: park each healthy SMTP session in the environment (when sessions
        are kept), close the others and release their slots."""
        for integration_id in list(self._open):
            entry = self._open.pop(integration_id)
            if not self._parkable(integration_id, entry):
                self._close(entry)
            elif self._idle is not None and (
                self._covers_server_idle(entry) or self._renew(entry, _PARKED_LEASE_SECONDS, parking=True)
            ):
                self._idle.park(integration_id, entry)

    def _covers_server_idle(self, entry: _Open) -> bool:
        """Whether the session's lease, renewed less than :data:`PARK_RENEWAL_SLACK_SECONDS` ago,
        still runs past the server's idle timeout from now: parking it then needs no write."""
        slot = entry.slot
        return slot is not None and slot.leased and slot.expires_at - self._clock() >= _IDLE_COVER_SECONDS

    def _parkable(self, integration_id: str, entry: _Open) -> bool:
        held = integration_id in self._held_until or integration_id in self._broken
        return self._idle is not None and bool(entry.fingerprint) and not held and entry.is_open()

    def connections(self) -> int:
        return len(self._open)

    def _new_session(self, integration: Integration) -> tuple[MailSession, BrokerTokens | None]:
        from mailbroker.smtp.transport import SmtpSession
        from mailbroker.smtp.xoauth2 import BasicAuth, XOAuth2Auth

        if integration.transport != "smtp":
            from mailbroker.transports import api_session

            # An HTTP session's result has the SMTP result's shape (reply, accepted, refused),
            # its reply being the API's answer as text.
            api = api_session(integration, BrokerTokens(self._broker, integration.id))
            return cast("MailSession", api), None
        tokens = None
        if isinstance(integration, BasicIntegration):
            auth: Authenticator = BasicAuth(integration.password)
        else:
            tokens = BrokerTokens(self._broker, integration.id)
            auth = XOAuth2Auth(tokens)
        factory: SessionFactory = self._factory or SmtpSession
        session = factory(
            integration.smtp, username=integration.username, auth=auth, ssl_context=self._ssl_context
        )
        return session, tokens

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
