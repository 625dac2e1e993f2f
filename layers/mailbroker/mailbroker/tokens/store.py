"""The DynamoDB level of the token cache, and the refresh lease that makes one environment
refresh a credential while the others wait or keep using the old token.

One item per credential identity (``pk = token#<sha256>``):

- ``ct``/``nonce``/``edk``: the access token sealed with the stack's KMS key (see ``crypto``);
- ``issued_at``/``expires_at``/``version``: plain numbers every reader checks itself, because
  DynamoDB's TTL (``ttl``) deletes expired items days late;
- ``lease_owner``/``lease_expires``: the refresh lease, taken with a conditional write that also
  requires the ``version`` the caller saw, so a caller that read before someone else's refresh
  cannot start a second one; a lease whose holder died simply expires;
- ``hold_until``/``hold_code``/``hold_message``: after a 429 (Retry-After) or a permanent error,
  every environment holds off the provider until then instead of asking again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailbroker.dynamodb import Table, integer, number, text
from mailbroker.tokens.crypto import Sealed, TokenCipher
from mailbroker.tokens.model import CachedToken

_TTL_GRACE = 86400  # keep expired items a day for diagnosis before TTL may delete them


@dataclass(frozen=True)
class StoredState:
    token: CachedToken | None
    version: int | None  # None: no item yet
    lease_owner: str | None
    lease_expires: float
    hold_until: float
    hold_code: str | None
    hold_message: str | None
    hold_retry_after: bool = False


class TokenStore:
    def __init__(self, dynamodb_client: Any, table: str, cipher: TokenCipher) -> None:
        self._table = Table(dynamodb_client, table, purpose="for a cached token")
        self._cipher = cipher

    def read(self, key: str) -> StoredState:
        item = self._table.get(key)
        if not item:
            return StoredState(None, None, None, 0.0, 0.0, None, None)
        token = None
        if "ct" in item:
            sealed = Sealed(item["ct"]["B"], item["nonce"]["B"], item["edk"]["B"])
            plaintext = self._cipher.open(sealed, key.encode())
            token = CachedToken(
                plaintext.decode(),
                issued_at=number(item, "issued_at"),
                expires_at=number(item, "expires_at"),
                version=int(item["version"]["N"]),
            )
        return StoredState(
            token=token,
            version=integer(item, "version") or 0,
            lease_owner=text(item, "lease_owner"),
            lease_expires=number(item, "lease_expires"),
            hold_until=number(item, "hold_until"),
            hold_code=text(item, "hold_code"),
            hold_message=text(item, "hold_message"),
            hold_retry_after=text(item, "hold_kind") == "retry_after",
        )

    def try_lease(self, key: str, owner: str, *, now: float, ttl: float, seen_version: int | None) -> bool:
        """Take the refresh lease if nobody holds a live one and nobody refreshed since
        ``seen_version`` was read."""
        condition = "(attribute_not_exists(lease_expires) OR lease_expires < :now) AND "
        values: dict[str, Any] = {
            ":owner": {"S": owner},
            ":exp": {"N": repr(now + ttl)},
            ":now": {"N": repr(now)},
        }
        if seen_version is None:
            condition += "attribute_not_exists(pk)"
        elif seen_version == 0:
            condition += "attribute_not_exists(version)"
        else:
            condition += "version = :v"
            values[":v"] = {"N": str(seen_version)}
        return self._table.update(
            key, "SET lease_owner = :owner, lease_expires = :exp", condition=condition, values=values
        )

    def save(self, key: str, owner: str, token: CachedToken) -> int | None:
        """Store a new token and release the lease. Returns the new version, or None when the
        lease had expired and passed to another environment (which will store its own)."""
        sealed = self._cipher.seal(token.access_token.encode(), key.encode())
        written = self._table.update_returning(
            key,
            "SET ct = :ct, nonce = :nonce, edk = :edk, issued_at = :iat, expires_at = :exp, "
            "#ttl = :ttl, version = if_not_exists(version, :zero) + :one "
            "REMOVE lease_owner, lease_expires, hold_until, hold_code, hold_message, hold_kind",
            condition="lease_owner = :owner",
            names={"#ttl": "ttl"},
            values={
                ":ct": {"B": sealed.ciphertext},
                ":nonce": {"B": sealed.nonce},
                ":edk": {"B": sealed.encrypted_key},
                ":iat": {"N": repr(token.issued_at)},
                ":exp": {"N": repr(token.expires_at)},
                ":ttl": {"N": str(int(token.expires_at) + _TTL_GRACE)},
                ":zero": {"N": "0"},
                ":one": {"N": "1"},
                ":owner": {"S": owner},
            },
            returning="UPDATED_NEW",
        )
        return None if written is None else int(written["version"]["N"])

    def release(
        self,
        key: str,
        owner: str,
        *,
        hold_until: float | None = None,
        hold_code: str | None = None,
        hold_message: str | None = None,
        retry_after: bool = False,
    ) -> None:
        """Give the lease back; with ``hold_until``, tell every environment to leave the provider
        alone until then and answer ``hold_code`` instead."""
        values: dict[str, Any] = {":owner": {"S": owner}}
        if hold_until is not None and hold_code:
            update = "SET hold_until = :hu, hold_code = :hc, hold_message = :hm, hold_kind = :hk "
            update += "REMOVE lease_owner, lease_expires"
            values.update(
                {
                    ":hu": {"N": repr(hold_until)},
                    ":hc": {"S": hold_code},
                    ":hm": {"S": (hold_message or "")[:300]},
                    ":hk": {"S": "retry_after" if retry_after else "error"},
                }
            )
        else:
            update = "REMOVE lease_owner, lease_expires"
        # False: the lease had already passed to another environment, which now owns the item.
        self._table.update(key, update, condition="lease_owner = :owner", values=values)
