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
  every environment holds off the provider until then instead of asking again;
- for a credential whose refresh token rotates (``microsoft_delegated``): ``rt_ct``/``rt_nonce``/
  ``rt_edk``, the newest refresh token sealed like the access token; ``rt_fp``, its fingerprint,
  which the next save must still find (so a rotation is never overwritten by an older one);
  ``rt_seed`` and ``rt_lineage``, the fingerprints of the refresh tokens this chain started from and
  held lately (a secret holding one of them is behind, not a fresh consent); ``rt_written_at``,
  when the newest one was last written back to the integration's secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mailbroker.dynamodb import Table, integer, number, text
from mailbroker.tokens.crypto import Sealed, TokenCipher
from mailbroker.tokens.model import CachedToken, fingerprint

_TTL_GRACE = 86400  # keep expired items a day for diagnosis before TTL may delete them
# An item holding a refresh token outlives Microsoft's 90-day idle limit: TTL never takes the
# newest refresh token of a live credential.
_REFRESH_TTL = 100 * 86400
# How many earlier refresh-token fingerprints a chain remembers.
_LINEAGE = 64


@dataclass(frozen=True)
class RefreshState:
    """The newest refresh token of a rotating credential, as the token table holds it."""

    refresh_token: str = field(repr=False)
    fingerprint: str
    seed: str  # fingerprint of the refresh token the chain started from (the secret's, then)
    lineage: tuple[str, ...]
    written_at: float

    def knows(self, fingerprint: str) -> bool:
        """Whether ``fingerprint`` is this chain's (current, seed or recent): a secret holding it
        is behind the table, not a new consent."""
        return fingerprint in {self.fingerprint, self.seed, *self.lineage}


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
    refresh: RefreshState | None = None


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
            refresh=self._refresh_state(key, item),
        )

    def _refresh_state(self, key: str, item: dict[str, Any]) -> RefreshState | None:
        if "rt_ct" not in item:
            return None
        sealed = Sealed(item["rt_ct"]["B"], item["rt_nonce"]["B"], item["rt_edk"]["B"])
        return RefreshState(
            self._cipher.open(sealed, _refresh_aad(key)).decode(),
            fingerprint=text(item, "rt_fp") or "",
            seed=text(item, "rt_seed") or "",
            lineage=tuple(v["S"] for v in item.get("rt_lineage", {}).get("L", [])),
            written_at=number(item, "rt_written_at"),
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

    def renew_lease(self, key: str, owner: str, *, now: float, ttl: float) -> bool:
        """Extend this caller's live lease to ``now + ttl``; False when it has expired or passed to
        another environment (which may be redeeming the same refresh token: this one must not)."""
        return self._table.update(
            key,
            "SET lease_expires = :exp",
            condition="lease_owner = :owner AND lease_expires >= :now",
            values={":owner": {"S": owner}, ":exp": {"N": repr(now + ttl)}, ":now": {"N": repr(now)}},
        )

    def save(self, key: str, owner: str, token: CachedToken, rotation: Rotation | None = None) -> int | None:
        """Store a new token and release the lease. Returns the new version, or None when the
        lease had expired and passed to another environment (which will store its own).

        With ``rotation`` (a rotating credential's new refresh token), the condition is instead
        that the refresh token redeemed is still the newest stored: a rotation is kept even if the
        lease ran out meanwhile, and never replaces a newer one."""
        sealed = self._cipher.seal(token.access_token.encode(), key.encode())
        update = (
            "SET ct = :ct, nonce = :nonce, edk = :edk, issued_at = :iat, expires_at = :exp, "
            "#ttl = :ttl, version = if_not_exists(version, :zero) + :one"
        )
        values: dict[str, Any] = {
            ":ct": {"B": sealed.ciphertext},
            ":nonce": {"B": sealed.nonce},
            ":edk": {"B": sealed.encrypted_key},
            ":iat": {"N": repr(token.issued_at)},
            ":exp": {"N": repr(token.expires_at)},
            ":ttl": {"N": str(int(token.expires_at) + _TTL_GRACE)},
            ":zero": {"N": "0"},
            ":one": {"N": "1"},
        }
        condition = "lease_owner = :owner"
        if rotation is None:
            values[":owner"] = {"S": owner}
        else:
            update, condition = self._with_rotation(key, update, values, rotation, token.issued_at)
        update += " REMOVE lease_owner, lease_expires, hold_until, hold_code, hold_message, hold_kind"
        written = self._table.update_returning(
            key, update, condition=condition, names={"#ttl": "ttl"}, values=values, returning="UPDATED_NEW"
        )
        return None if written is None else int(written["version"]["N"])

    def _with_rotation(
        self, key: str, update: str, values: dict[str, Any], rotation: Rotation, now: float
    ) -> tuple[str, str]:
        sealed = self._cipher.seal(rotation.refresh_token.encode(), _refresh_aad(key))
        lineage = [*rotation.lineage, rotation.redeemed][-_LINEAGE:]
        update += (
            ", rt_ct = :rct, rt_nonce = :rnonce, rt_edk = :redk, rt_fp = :rfp, rt_seed = :rseed, "
            "rt_lineage = :rlin"
        )
        values.update(
            {
                ":rct": {"B": sealed.ciphertext},
                ":rnonce": {"B": sealed.nonce},
                ":redk": {"B": sealed.encrypted_key},
                ":rfp": {"S": fingerprint(rotation.refresh_token)},
                ":rseed": {"S": rotation.seed or rotation.redeemed},
                ":rlin": {"L": [{"S": fp} for fp in lineage]},
                ":ttl": {"N": str(int(now) + _REFRESH_TTL)},
            }
        )
        if rotation.stored is None:
            return update, "attribute_not_exists(rt_fp)"
        values[":seen_rt"] = {"S": rotation.stored}
        return update, "rt_fp = :seen_rt"

    def claim_write_back(self, key: str, fingerprint_: str, *, now: float, interval: float) -> float | None:
        """Claim the write-back of refresh token ``fingerprint_`` to the secret: at most one per
        ``interval`` seconds per credential, across every environment. Returns the previous write
        time (to give the claim back if the write fails), or None when it is not this caller's turn."""
        written = self._table.update_returning(
            key,
            "SET rt_written_at = :now",
            condition="rt_fp = :fp AND (attribute_not_exists(rt_written_at) OR rt_written_at <= :due)",
            values={
                ":now": {"N": repr(now)},
                ":due": {"N": repr(now - interval)},
                ":fp": {"S": fingerprint_},
            },
            returning="UPDATED_OLD",
        )
        return None if written is None else number(written, "rt_written_at")

    def unclaim_write_back(self, key: str, *, claimed_at: float, previous: float) -> None:
        """Give a write-back claim back after the secret could not be written."""
        self._table.update(
            key,
            "SET rt_written_at = :prev",
            condition="rt_written_at = :claimed",
            values={":prev": {"N": repr(previous)}, ":claimed": {"N": repr(claimed_at)}},
        )

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


@dataclass(frozen=True)
class Rotation:
    """A rotating credential's new refresh token, and what it replaces: ``redeemed`` is the
    fingerprint of the refresh token just exchanged, ``stored`` the one the table held when the
    exchange began (None: no chain yet), ``seed``/``lineage`` the chain's history."""

    refresh_token: str = field(repr=False)
    redeemed: str
    stored: str | None
    seed: str
    lineage: tuple[str, ...] = ()


def _refresh_aad(key: str) -> bytes:
    return (key + "#refresh_token").encode()
