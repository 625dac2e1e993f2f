"""The typed seams between modules: what a collaborator must offer, as ``Protocol``s.

Delivery, the message queue, the keeper and the token broker take their collaborators through
these, so a test (or another implementation) can hand in anything with the same methods, and a
type checker sees every call across the seam. The implementations are
:class:`mailbroker.integrations.IntegrationStore`, :class:`mailbroker.tokens.broker.TokenBroker`,
:class:`mailbroker.governor.SendGovernor`, :class:`mailbroker.health.SnsAlerts` and
:class:`mailbroker.smtp.transport.SmtpSession`; :mod:`mailbroker.runtime` builds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import ssl

    from mailbroker.governor import ConnectionSlot, RateGrant
    from mailbroker.health import Alert
    from mailbroker.integrations import Integration, Limits, SmtpEndpoint
    from mailbroker.smtp.transport import SendResult
    from mailbroker.smtp.xoauth2 import Authenticator
    from mailbroker.tokens.model import AccessToken, CachedToken


class IntegrationSource(Protocol):
    """Integrations by id (an unknown id raises ``UnknownIntegration``)."""

    def get(self, integration_id: str, *, force_fetch: bool = False) -> Integration: ...


class IntegrationCatalogue(IntegrationSource, Protocol):
    """Integrations by id, and the list of every id (the keeper walks them all)."""

    def list_ids(self) -> list[str]: ...


class TokenSource(Protocol):
    """Valid access tokens, by integration id (delivery) or for an integration in hand."""

    def token_for(
        self, integration_id: str, *, force_refresh: bool = False, rejected_token: str | None = None
    ) -> AccessToken: ...

    def token_for_integration(
        self, integration: Integration, *, force_refresh: bool = False, rejected_token: str | None = None
    ) -> AccessToken: ...


class TokenKeeper(TokenSource, Protocol):
    """A token source that also shows what the shared cache holds (the keeper's health records)."""

    def stored(self, integration: Integration) -> CachedToken | None: ...


class Governor(Protocol):
    """Per-integration pace and connection slots, shared by every sender."""

    def open_connection(
        self, integration_id: str, limits: Limits, *, holder: str, lease_seconds: float
    ) -> ConnectionSlot: ...

    def renew_connection(
        self, slot: ConnectionSlot, *, lease_seconds: float, unless_wanted: bool = False
    ) -> ConnectionSlot | None: ...

    def release_connection(self, slot: ConnectionSlot) -> None: ...

    def take_message(self, integration_id: str, limits: Limits, recipients: int = 1) -> None: ...

    def take_messages(self, integration_id: str, limits: Limits, wanted: int) -> RateGrant: ...

    def give_back(self, grant: RateGrant, unused: int) -> None: ...

    def count_recipients(self, integration_id: str, limits: Limits, recipients: int) -> None: ...

    def slow_down(self, integration_id: str, *, seconds: float) -> None: ...


class AlertSink(Protocol):
    """Where the keeper sends an alert; answers whether it was published."""

    def publish(self, alert: Alert) -> bool: ...


class MailSession(Protocol):
    """One authenticated connection that sends many messages (``SmtpSession``)."""

    def open(self) -> None: ...

    def send(
        self, mail_from: str, rcpts: list[str], data: bytes, *, smtputf8: bool = False
    ) -> SendResult: ...

    def close(self) -> None: ...


class SessionFactory(Protocol):
    """Builds a :class:`MailSession` for an integration's endpoint (``SmtpSession`` itself)."""

    def __call__(
        self,
        endpoint: SmtpEndpoint,
        *,
        username: str,
        auth: Authenticator,
        ssl_context: ssl.SSLContext | None = None,
    ) -> MailSession: ...
