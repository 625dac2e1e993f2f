"""The token broker: memory of the execution environment, then DynamoDB, then the provider.

``TokenBroker.token_for`` is where a token is refreshed. One refresh per credential per lifetime
across all environments: a caller that finds the cached token due for refresh takes the lease in
DynamoDB (``TokenStore.try_lease``) and asks the provider; everyone else keeps serving the old
token while it is still usable, or waits briefly for the new one.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from mailbroker.errors import AwsUnavailable, InvalidIntegration, TokenError, TokenUnavailable
from mailbroker.integrations import BasicIntegration, MicrosoftDelegatedIntegration
from mailbroker.observability import logger
from mailbroker.tokens.model import AccessToken, CachedToken, IssuedToken, RefreshPolicy, Source, fingerprint
from mailbroker.tokens.providers import TokenProviders, identity_of
from mailbroker.tokens.store import Rotation, StoredState, TokenStore

if TYPE_CHECKING:
    from mailbroker.integrations import Integration
    from mailbroker.seams import IntegrationSource

# After a permanent failure (invalid_grant, invalid_client), environments leave the provider alone
# this long and answer the same error, so a broken credential costs one call, not one per caller.
PERMANENT_ERROR_HOLD = 30.0
# force_refresh without naming the refused token does not replace a token younger than this.
MIN_FORCE_INTERVAL = 10.0
# Secrets Manager asks for no more than one PutSecretValue per secret every ten minutes.
WRITE_BACK_INTERVAL = 600.0


class TokenBroker:
    def __init__(
        self,
        integrations: IntegrationSource,
        store: TokenStore,
        providers: TokenProviders,
        *,
        policy: RefreshPolicy | None = None,
        lease_ttl: float = 15.0,
        lease_wait: float = 8.0,
        write_back_interval: float = WRITE_BACK_INTERVAL,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.integrations = integrations
        self.store = store
        self.providers = providers
        self.policy = policy or RefreshPolicy()
        self.lease_ttl = lease_ttl
        self.lease_wait = lease_wait
        self.write_back_interval = write_back_interval
        self._clock = clock
        self._sleep = sleep
        self._owner = uuid.uuid4().hex
        self._memory: dict[str, CachedToken] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def token_for(
        self, integration_id: str, *, force_refresh: bool = False, rejected_token: str | None = None
    ) -> AccessToken:
        """A valid access token for the integration ``integration_id``.

        ``rejected_token``: a token a server just refused; it is never handed out again.
        ``force_refresh``: replace the current token unless it was issued in the last few seconds.
        """
        integration = self.integrations.get(integration_id)
        return self.token_for_integration(
            integration, force_refresh=force_refresh, rejected_token=rejected_token
        )

    def token_for_integration(
        self, integration: Integration, *, force_refresh: bool = False, rejected_token: str | None = None
    ) -> AccessToken:
        if isinstance(integration, BasicIntegration):
            raise InvalidIntegration(
                f"integration {integration.id!r} uses basic authentication: it has no OAuth2 token"
            )
        identity = identity_of(integration)
        key = identity.key
        rejected = fingerprint(rejected_token) if rejected_token else None
        with self._lock_for(key):
            now = self._clock()
            held = self._memory.get(key)
            if (
                held
                and self._acceptable(held, now, force_refresh, rejected)
                and self.policy.is_fresh(held, now)
            ):
                return _answer(held, "memory")
            if rejected and held and held.fingerprint == rejected:
                self._memory.pop(key, None)
            return self._from_store_or_provider(integration, key, identity.label, force_refresh, rejected)

    def stored(self, integration: Integration) -> CachedToken | None:
        """The token DynamoDB holds for the integration now (for health records), if any."""
        return self.store.read(identity_of(integration).key).token

    def forget_memory(self) -> None:
        self._memory.clear()

    # ---------------------------------------------------------------------------------------------

    def _from_store_or_provider(
        self, integration: Integration, key: str, label: str, force: bool, rejected: str | None
    ) -> AccessToken:
        deadline = self._clock() + self.lease_wait
        pause = 0.02
        while True:
            state = self.store.read(key)
            now = self._clock()
            token = state.token
            good = token if token and self._acceptable(token, now, force, rejected) else None
            if good and self.policy.is_fresh(good, now):
                self._memory[key] = good
                return _answer(good, "cache")
            usable = good if good and self.policy.is_usable(good, now) else None
            if state.hold_until > now:
                if usable:
                    return _answer(usable, "cache")
                raise _held_error(state, now)
            lease_free = not state.lease_owner or state.lease_expires < now
            if lease_free and self.store.try_lease(
                key, self._owner, now=now, ttl=self.lease_ttl, seen_version=state.version
            ):
                return self._refresh(integration, key, label, state)
            if usable:
                # Another environment is refreshing: the old token is still good for a while.
                return _answer(usable, "cache")
            if now >= deadline:
                raise TokenUnavailable(
                    f"another environment is refreshing the token for {integration.id!r}; "
                    "none arrived in time",
                    retry_after=1.0,
                )
            self._sleep(pause)
            pause = min(pause * 2, 0.25)

    def _refresh(self, integration: Integration, key: str, label: str, state: StoredState) -> AccessToken:
        started = self._clock()
        rotation: Rotation | None = None
        try:
            if isinstance(integration, MicrosoftDelegatedIntegration):
                issued, rotation = self._redeem(integration, key, state)
            else:
                issued = self.providers.fetch(integration)
        except TokenError as exc:
            self._release_after_failure(key, exc, started)
            logger.warning(
                "token refresh failed",
                extra={"integration": integration.id, "credential": label, "code": exc.code},
            )
            raise
        except BaseException:
            self.store.release(key, self._owner)
            raise
        now = self._clock()
        token = CachedToken(issued.access_token, issued_at=now, expires_at=now + issued.expires_in)
        version = self._save(integration, key, token, rotation)
        token = replace(token, version=version or 0)
        self._memory[key] = token
        logger.info(
            "token refreshed",
            extra={
                "integration": integration.id,
                "credential": label,
                "lifetime_seconds": round(issued.expires_in, 3),
                "fetch_ms": round((now - started) * 1000, 1),
                "refresh_token_rotated": rotation is not None,
            },
        )
        if (
            rotation is not None
            and version is not None
            and isinstance(integration, MicrosoftDelegatedIntegration)
        ):
            self._write_back(integration, key, rotation)
        return _answer(token, "provider")

    def _save(
        self, integration: Integration, key: str, token: CachedToken, rotation: Rotation | None
    ) -> int | None:
        try:
            version = self.store.save(key, self._owner, token, rotation)
        except AwsUnavailable:
            # The provider answered: the caller gets its token even if DynamoDB did not take it.
            # The lease expires by itself and the next environment to need a token refreshes. A
            # new refresh token goes straight to the secret instead: it must not be lost.
            logger.warning("token refreshed but not cached", extra={"integration": integration.id})
            if rotation is not None and isinstance(integration, MicrosoftDelegatedIntegration):
                self._write_back(integration, key, rotation, claim=False)
            return None
        if version is None and rotation is not None:
            # A newer refresh token was stored meanwhile (this lease had run out): that one stays.
            self.store.release(key, self._owner)
        return version

    # --- rotating refresh tokens (microsoft_delegated) -------------------------------------------

    def _redeem(
        self, integration: MicrosoftDelegatedIntegration, key: str, state: StoredState
    ) -> tuple[IssuedToken, Rotation | None]:
        """Exchange the newest refresh token: the table's, unless the secret holds one this chain
        never had (a fresh consent). Called under the lease, with the state the lease was taken on.

        The client is prepared first (MSAL's authority discovery), then the lease is renewed for the
        one token request: a lease that ran out meanwhile may be another environment's now, and two
        environments must never redeem the same refresh token."""
        prepare = getattr(self.providers, "prepare", None)
        if prepare is not None:
            prepare(integration)
        if not self.store.renew_lease(key, self._owner, now=self._clock(), ttl=self.lease_ttl):
            raise TokenUnavailable(
                f"the refresh of {integration.id!r} passed to another environment", retry_after=1.0
            )
        in_secret = integration.refresh_token.get_secret_value()
        chain = state.refresh
        if chain is not None and chain.knows(fingerprint(in_secret)):
            refresh_token, seed, lineage = chain.refresh_token, chain.seed, chain.lineage
        else:
            refresh_token, seed, lineage = in_secret, fingerprint(in_secret), ()
        issued = self.providers.fetch(integration, refresh_token=refresh_token)
        if not issued.refresh_token or issued.refresh_token == refresh_token:
            return issued, None
        return issued, Rotation(
            issued.refresh_token,
            redeemed=fingerprint(refresh_token),
            stored=chain.fingerprint if chain is not None else None,
            seed=seed,
            lineage=lineage,
        )

    def sync_refresh_token(self, integration: Integration) -> bool:
        """Write the newest refresh token back to the integration's secret if the secret is behind
        and the write-back interval allows (the keeper calls this on every run)."""
        if not isinstance(integration, MicrosoftDelegatedIntegration):
            return False
        key = identity_of(integration).key
        chain = self.store.read(key).refresh
        in_secret = fingerprint(integration.refresh_token.get_secret_value())
        if chain is None or chain.fingerprint == in_secret or not chain.knows(in_secret):
            return False
        rotation = Rotation(chain.refresh_token, "", chain.fingerprint, chain.seed, chain.lineage)
        return self._write_back(integration, key, rotation)

    def _write_back(
        self, integration: MicrosoftDelegatedIntegration, key: str, rotation: Rotation, *, claim: bool = True
    ) -> bool:
        """Put ``rotation.refresh_token`` into the integration's secret, at most once per
        ``write_back_interval`` across environments (``claim``), and never over a refresh token
        this chain does not know (an operator's fresh consent)."""
        writer = getattr(self.integrations, "write_refresh_token", None)
        new = fingerprint(rotation.refresh_token)
        if writer is None or fingerprint(integration.refresh_token.get_secret_value()) == new:
            return False
        now = self._clock()
        previous = None
        known = {rotation.seed, rotation.redeemed, rotation.stored, *rotation.lineage} - {None, ""}
        try:
            if claim:
                previous = self.store.claim_write_back(key, new, now=now, interval=self.write_back_interval)
                if previous is None:
                    return False
            written = bool(writer(integration.id, rotation.refresh_token, known))
        except AwsUnavailable as exc:
            logger.warning(
                "refresh token not written back to the secret",
                extra={"integration": integration.id, "code": exc.code},
            )
            if previous is not None:
                with contextlib.suppress(AwsUnavailable):  # the claim then lapses after the interval
                    self.store.unclaim_write_back(key, claimed_at=now, previous=previous)
            return False
        if written:
            logger.info("refresh token written back to the secret", extra={"integration": integration.id})
        return written

    def _release_after_failure(self, key: str, exc: TokenError, now: float) -> None:
        if exc.retry_after:
            self.store.release(
                key,
                self._owner,
                hold_until=now + exc.retry_after,
                hold_code=exc.code,
                hold_message=exc.message,
                retry_after=True,
            )
        elif not exc.retryable:
            self.store.release(
                key,
                self._owner,
                hold_until=now + PERMANENT_ERROR_HOLD,
                hold_code=exc.code,
                hold_message=exc.message,
            )
        else:
            self.store.release(key, self._owner)

    def _acceptable(self, token: CachedToken, now: float, force: bool, rejected: str | None) -> bool:
        if rejected is not None:
            return token.fingerprint != rejected
        if force:
            return now - token.issued_at < MIN_FORCE_INTERVAL
        return True

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())


def _answer(token: CachedToken, source: Source) -> AccessToken:
    return AccessToken(token.access_token, expires_at=token.expires_at, source=source)


def _held_error(state: StoredState, now: float) -> TokenError:
    wait = round(max(state.hold_until - now, 0.0), 3)
    message = state.hold_message or "the provider asked to wait"
    if state.hold_retry_after:
        return TokenError(message, code=state.hold_code or "token_unavailable", retry_after=wait)
    return TokenError(message, code=state.hold_code or "token_unavailable")
