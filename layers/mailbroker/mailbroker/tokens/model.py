"""Token values and the refresh policy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from mailbroker.errors import remember_secret

Source = Literal["memory", "cache", "provider"]


@dataclass(frozen=True)
class IssuedToken:
    """What a provider returned: the token and the lifetime it announced."""

    access_token: str = field(repr=False)
    expires_in: float
    token_type: str = "Bearer"  # noqa: S105 (a scheme name)
    # A rotating credential's next refresh token, when the provider returned one.
    refresh_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        remember_secret(self.access_token)


@dataclass(frozen=True)
class CachedToken:
    """A token as the cache holds it: absolute times, so every reader checks expiry itself."""

    access_token: str = field(repr=False)
    issued_at: float
    expires_at: float
    version: int = 0

    def __post_init__(self) -> None:
        remember_secret(self.access_token)

    @property
    def lifetime(self) -> float:
        return max(self.expires_at - self.issued_at, 0.0)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.access_token)


@dataclass(frozen=True)
class AccessToken:
    """The broker's answer."""

    access_token: str = field(repr=False)
    expires_at: float
    source: Source
    token_type: str = "Bearer"  # noqa: S105 (a scheme name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_at": int(self.expires_at),
            "source": self.source,
        }


def fingerprint(token: str) -> str:
    """A stable, non-reversible name for a token (to compare without storing it)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RefreshPolicy:
    """When a token is due for refresh, and when it is still good enough to hand out.

    Refresh when less than ``max(min_margin, fraction * lifetime)`` remains, using the lifetime the
    provider returned. The margin is capped at half the lifetime so that a provider issuing short
    tokens is not asked for a new one on every call. A token is *usable* while more than
    ``min(60 s, lifetime / 10)`` remains: that is what a caller gets while another environment
    refreshes.
    """

    min_margin: float = 600.0
    fraction: float = 0.15

    def refresh_at(self, token: CachedToken) -> float:
        life = token.lifetime
        margin = min(max(self.min_margin, self.fraction * life), life / 2)
        return token.expires_at - margin

    def is_fresh(self, token: CachedToken, now: float) -> bool:
        return now < self.refresh_at(token)

    def is_usable(self, token: CachedToken, now: float) -> bool:
        return now < token.expires_at - min(60.0, token.lifetime / 10)


@dataclass(frozen=True)
class CredentialIdentity:
    """Who a token belongs to. Two mailboxes never share a token: the subject or username is part
    of the identity, with the provider, the tenant or token URL, the client id and the scope.
    ``proof`` is a digest of the credential itself, so a configuration that copies another
    integration's public fields without its secret is never served that integration's token."""

    provider: str
    issuer: str
    client_id: str
    subject: str
    scope: str
    proof: str = field(default="", repr=False)

    @property
    def key(self) -> str:
        raw = json.dumps(
            [self.provider, self.issuer, self.client_id, self.subject.lower(), self.scope, self.proof]
        )
        return "token#" + hashlib.sha256(raw.encode()).hexdigest()

    @property
    def label(self) -> str:
        """A short description for logs and metrics; holds no credential."""
        return f"{self.provider}:{self.client_id}:{self.subject}"
