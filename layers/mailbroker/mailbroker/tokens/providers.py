"""Token providers: the only code that talks to token endpoints.

Each flow uses the provider's own well-kept client library — MSAL for Microsoft client
credentials, google-auth for Gmail refresh tokens and Workspace service accounts, and MSAL's
generic RFC 6749 client (``msal.oauth2cli``) for any other client-credentials endpoint. They are
imported on the cache-miss path only, so a warm cache never loads them.

Every failure leaves here as a classified ``TokenError``; nothing here logs or raises a secret.
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import TYPE_CHECKING, Any

import requests
from pydantic import SecretStr

from mailbroker.errors import TokenError, classify_token_error, classify_transport_error
from mailbroker.integrations import (
    DEFAULT_MICROSOFT_AUTHORITY,
    GoogleIntegration,
    GoogleServiceAccountIntegration,
    MicrosoftDelegatedIntegration,
    MicrosoftIntegration,
    OAuth2Integration,
    context_of,
)
from mailbroker.tokens.credentials import credential_proof_parts, msal_credential
from mailbroker.tokens.http_client import VettedSession
from mailbroker.tokens.model import CredentialIdentity, IssuedToken

if TYPE_CHECKING:
    from mailbroker.tokens.web_identity import WebIdentityTokens


def _keyless_parts(integration: Any) -> list[str]:
    """What names a keyless credential: its kind and audience (there is no secret to digest)."""
    federated = getattr(integration, "federated", None)
    if federated is not None:
        return ["federated", federated.audience]
    workload = getattr(integration, "workload_identity", None)
    if workload is not None:
        return ["workload_identity", workload.audience, workload.service_account]
    return []


def identity_of(integration: Any) -> CredentialIdentity:
    """The credential identity a token is cached under."""
    if isinstance(integration, MicrosoftIntegration):
        return CredentialIdentity(
            "microsoft",
            f"{integration.authority}/{integration.tenant_id}",
            integration.client_id,
            integration.username,
            integration.scope,
            _proof(*credential_proof_parts(integration), *_keyless_parts(integration)),
        )
    if isinstance(integration, MicrosoftDelegatedIntegration):
        # The refresh token rotates, so it cannot name the credential: the integration does (its
        # refresh-token lineage is its own), with the client credential if it has one.
        return CredentialIdentity(
            "microsoft_delegated",
            f"{integration.authority}/{integration.tenant_id}",
            integration.client_id,
            integration.username,
            integration.scope,
            _proof(integration.id, *credential_proof_parts(integration)),
        )
    if isinstance(integration, GoogleIntegration):
        return CredentialIdentity(
            "google",
            integration.token_uri,
            integration.client_id,
            integration.username,
            integration.scope,
            _proof(integration.client_secret, integration.refresh_token),
        )
    if isinstance(integration, GoogleServiceAccountIntegration):
        return CredentialIdentity(
            "google_service_account",
            integration.effective_token_uri,
            integration.service_account_email,
            integration.subject,
            integration.scope,
            _proof(integration.service_account_info.private_key)
            if integration.service_account_info is not None
            else _proof(*_keyless_parts(integration)),
        )
    if isinstance(integration, OAuth2Integration):
        return CredentialIdentity(
            "oauth2",
            integration.token_url,
            integration.client_id,
            integration.username,
            integration.scope,
            _proof(integration.client_secret),
        )
    raise TypeError(f"{type(integration).__name__} does not use OAuth2 tokens")


def _proof(*secrets: SecretStr | str) -> str:
    """A digest of the credential: part of the cache key, never the credential itself."""
    digest = hashlib.sha256()
    for secret in secrets:
        value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        digest.update(value.encode() + b"\0")
    return digest.hexdigest()


class _TimeoutSession(VettedSession):
    """A session that caps every request's timeout and remembers the last answer's status and
    Retry-After (MSAL and google-auth do not surface them). As a ``VettedSession`` it connects only
    to allowed addresses and never follows a redirect (``tokens/http_client.py``)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout
        self._seen = threading.local()
        self.hooks["response"].append(self._remember)

    def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        given = kwargs.get("timeout")
        kwargs["timeout"] = min(given, self._timeout) if isinstance(given, int | float) else self._timeout
        self._seen.status = None
        self._seen.retry_after = None
        self._seen.error = None
        return super().request(method, url, *args, **kwargs)

    def _remember(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._seen.status = response.status_code
        self._seen.retry_after = _parse_retry_after(response.headers.get("Retry-After"))
        self._seen.error = _error_body(response) if response.status_code >= 400 else None

    @property
    def last_status(self) -> int | None:
        return getattr(self._seen, "status", None)

    @property
    def last_retry_after(self) -> float | None:
        return getattr(self._seen, "retry_after", None)

    @property
    def last_error(self) -> dict[str, Any]:
        """The RFC 6749 error body of the last answer, if it was an error with one (MSAL turns a
        failed OIDC discovery into a bare ``ValueError``: the Entra error is only here)."""
        return getattr(self._seen, "error", None) or {}


def _error_body(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return None
    codes = body.get("error_codes")
    return {
        "error": body["error"],
        "error_description": str(body.get("error_description") or ""),
        "error_codes": [c for c in codes if isinstance(c, int)] if isinstance(codes, list) else [],
    }


def _status_in(text: str) -> int | None:
    match = re.search(r"HTTP Error: (\d{3})", text)
    return int(match.group(1)) if match else None


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        import time
        from email.utils import parsedate_to_datetime

        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


# MSAL adds these itself and refuses them in a scope list.
_MSAL_RESERVED_SCOPES = frozenset({"offline_access", "openid", "profile"})


class TokenProviders:
    """Fetches a new access token for an integration from its provider."""

    def __init__(self, *, http_timeout: float = 10.0, web_identity: WebIdentityTokens | None = None) -> None:
        from mailbroker.observability import trace_library

        trace_library("requests")
        self._session = _TimeoutSession(http_timeout)
        self._web_identity = web_identity
        self._msal_apps: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def fetch(self, integration: Any, *, refresh_token: str | None = None) -> IssuedToken:
        """A new access token. ``refresh_token``: the newest refresh token of a rotating credential
        (``microsoft_delegated``), which may be newer than the one in the integration's secret."""
        if isinstance(integration, MicrosoftIntegration):
            return self._microsoft(integration)
        if isinstance(integration, MicrosoftDelegatedIntegration):
            return self._microsoft_delegated(
                integration, refresh_token or integration.refresh_token.get_secret_value()
            )
        if isinstance(integration, GoogleIntegration):
            return self._google(integration)
        if isinstance(integration, GoogleServiceAccountIntegration):
            return self._google_service_account(integration)
        if isinstance(integration, OAuth2Integration):
            return self._client_credentials(integration)
        raise TypeError(f"{type(integration).__name__} does not use OAuth2 tokens")

    def prepare(self, integration: Any) -> None:
        """Build the client now (MSAL's authority discovery), so that the token request that
        follows is a single HTTP exchange."""
        if isinstance(integration, MicrosoftIntegration | MicrosoftDelegatedIntegration):
            try:
                self._msal_app(integration)
            except (requests.RequestException, ValueError, OSError) as exc:
                raise self._transport_error(exc, integration.provider) from None

    # --- Microsoft: MSAL client credentials and refresh tokens ----------------------------------

    def _msal_app(self, integration: MicrosoftIntegration | MicrosoftDelegatedIntegration) -> Any:
        proof = _proof(*credential_proof_parts(integration), *_keyless_parts(integration))
        key = (
            integration.provider,
            integration.authority,
            integration.tenant_id,
            integration.client_id,
            proof,
        )
        with self._lock:
            app = self._msal_apps.get(key)
            if app is None:
                app = self._build_msal_app(integration)
                self._msal_apps[key] = app
        return app

    def _build_msal_app(self, integration: MicrosoftIntegration | MicrosoftDelegatedIntegration) -> Any:
        import msal

        federated = getattr(integration, "federated", None)
        if federated is not None:
            # Keyless: MSAL calls this for each token request, and each call mints a fresh JWT.
            credential, assertion = (
                {"client_assertion": self._web_identities().assertion(federated.audience)},
                None,
            )
        else:
            credential, assertion = msal_credential(integration)
        # The constructor fetches the tenant's OIDC metadata: built here, on a cache miss, never at
        # import. Authorities other than the public cloud's (sovereign clouds, the sandbox) skip
        # Microsoft's instance discovery and use their own OIDC discovery.
        options: dict[str, Any] = {
            "authority": f"{integration.authority}/{integration.tenant_id}",
            "http_client": self._session,
            "instance_discovery": integration.authority == DEFAULT_MICROSOFT_AUTHORITY,
        }
        if credential is None:
            app = msal.PublicClientApplication(integration.client_id, **options)
        else:
            app = msal.ConfidentialClientApplication(
                integration.client_id, client_credential=credential, **options
            )
        if assertion is not None:
            assertion.audience = app.authority.token_endpoint
        return app

    def _microsoft(self, integration: MicrosoftIntegration) -> IssuedToken:
        def acquire(app: Any) -> Any:
            # The broker decides when a token is due; MSAL's own cache must not answer instead.
            app.remove_tokens_for_client()
            return app.acquire_token_for_client(scopes=[integration.scope])

        result = self._msal_call(integration, acquire, "microsoft")
        return IssuedToken(result["access_token"], float(result.get("expires_in", 3600)))

    def _microsoft_delegated(
        self, integration: MicrosoftDelegatedIntegration, refresh_token: str
    ) -> IssuedToken:
        scopes = [s for s in integration.scope.split() if s not in _MSAL_RESERVED_SCOPES]

        def acquire(app: Any) -> Any:
            return app.acquire_token_by_refresh_token(refresh_token, scopes=scopes)

        result = self._msal_call(integration, acquire, "microsoft_delegated")
        return IssuedToken(
            result["access_token"],
            float(result.get("expires_in", 3600)),
            refresh_token=result.get("refresh_token"),
        )

    def _msal_call(self, integration: Any, acquire: Any, provider: str) -> dict[str, Any]:
        try:
            app = self._msal_app(integration)
            result = acquire(app)
        except ValueError as exc:
            # MSAL's OIDC discovery failed: a 4xx with an Entra error (AADSTS90002, a tenant that
            # does not exist) is configuration; anything else is a transport failure.
            seen = self._session.last_error
            if seen:
                raise classify_token_error(
                    status=self._session.last_status,
                    error=seen["error"],
                    description=seen["error_description"],
                    error_codes=seen["error_codes"],
                    provider=provider,
                    context=context_of(integration),
                ) from None
            raise self._transport_error(exc, provider) from None
        except (requests.RequestException, OSError) as exc:
            raise self._transport_error(exc, provider) from None
        except Exception as exc:
            from msal.exceptions import MsalServiceError

            if not isinstance(exc, MsalServiceError):
                raise
            # An error answer that is not JSON (a 5xx or 429 page): MSAL raises "HTTP Error: <status>"
            # instead of returning a result, and replays it from its throttling cache for a while.
            status = _status_in(str(exc)) or self._session.last_status
            raise classify_token_error(
                status=status, retry_after=self._session.last_retry_after, provider=provider
            ) from None
        if "access_token" in result:
            return dict(result)
        raise classify_token_error(
            status=self._session.last_status,
            error=result.get("error"),
            description=result.get("error_description"),
            error_codes=result.get("error_codes"),
            retry_after=self._session.last_retry_after,
            provider=provider,
            context=context_of(integration),
        )

    # --- Google: refresh token and service account (google-auth) ------------------------------

    def _google(self, integration: GoogleIntegration) -> IssuedToken:
        from google.oauth2.credentials import Credentials

        creds = Credentials(
            token=None,
            refresh_token=integration.refresh_token.get_secret_value(),
            token_uri=integration.token_uri,
            client_id=integration.client_id,
            client_secret=integration.client_secret.get_secret_value(),
        )
        return self._refresh_google(creds, "google", integration)

    def _web_identities(self) -> WebIdentityTokens:
        if self._web_identity is None:
            raise TokenError(
                "keyless credentials need AWS STS, and this process was given no STS client",
                code="federation_not_permitted",
            )
        return self._web_identity

    def _google_service_account(self, integration: GoogleServiceAccountIntegration) -> IssuedToken:
        from google.oauth2 import service_account

        if integration.workload_identity is not None:
            from mailbroker.tokens.workload_identity import KeylessServiceAccount

            keyless = KeylessServiceAccount(integration, self._web_identities(), self._session)
            return keyless.fetch()
        assert integration.service_account_info is not None
        info = integration.service_account_info.as_info()
        info["token_uri"] = integration.effective_token_uri
        try:
            creds = service_account.Credentials.from_service_account_info(
                info, scopes=[integration.scope], subject=integration.subject
            )
        except (ValueError, KeyError):
            raise TokenError(
                "service_account_info is not a usable service account key", code="token_invalid_client"
            ) from None
        return self._refresh_google(creds, "google_service_account", integration)

    def _refresh_google(self, creds: Any, provider: str, integration: Any) -> IssuedToken:
        import time

        from google.auth import exceptions
        from google.auth.transport.requests import Request

        try:
            creds.refresh(Request(session=self._session))
        except exceptions.RefreshError as exc:
            data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
            raise classify_token_error(
                status=self._session.last_status,
                error=data.get("error") or ("server_error" if getattr(exc, "retryable", False) else None),
                description=data.get("error_description"),
                retry_after=self._session.last_retry_after,
                provider=provider,
                context=context_of(integration),
            ) from None
        except (exceptions.TransportError, requests.RequestException, OSError) as exc:
            raise self._transport_error(exc, provider) from None
        # google-auth converts expires_in to an absolute naive-UTC expiry.
        import calendar

        expires_in = calendar.timegm(creds.expiry.timetuple()) - time.time() if creds.expiry else 3600.0
        return IssuedToken(creds.token, max(expires_in, 0.0))

    # --- Any OAuth2 server: client credentials (RFC 6749 §4.4) ---------------------------------

    def _client_credentials(self, integration: OAuth2Integration) -> IssuedToken:
        from msal.oauth2cli.oauth2 import Client

        client = Client(
            {"token_endpoint": integration.token_url},
            integration.client_id,
            http_client=self._session,
            client_secret=integration.client_secret.get_secret_value(),
        )
        try:
            result = client.obtain_token_for_client(scope=integration.scope.split())
        except (requests.RequestException, ValueError, OSError) as exc:
            raise self._transport_error(exc, "oauth2") from None
        if "access_token" in result:
            return IssuedToken(result["access_token"], float(result.get("expires_in", 3600)))
        raise classify_token_error(
            status=self._session.last_status,
            error=result.get("error"),
            description=result.get("error_description"),
            retry_after=self._session.last_retry_after,
            provider="oauth2",
            context=context_of(integration),
        )

    def _transport_error(self, exc: BaseException, provider: str) -> TokenError:
        status = self._session.last_status
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            status = exc.response.status_code
        if (
            status is not None
            and status >= 400
            and not isinstance(exc, requests.ConnectionError | requests.Timeout)
        ):
            return classify_token_error(
                status=status, retry_after=self._session.last_retry_after, provider=provider
            )
        return classify_transport_error(exc, provider)
