"""Keyless Google service account: workload identity federation, impersonation, then domain-wide
delegation through IAM Credentials ``signJwt``.

1. google-auth's identity-pool credentials exchange the function's AWS web identity token at
   Google's STS (the subject token comes from a ``SubjectTokenSupplier``) and impersonate the
   service account (IAM Credentials ``generateAccessToken``): an access token of the service
   account, for the IAM API.
2. Domain-wide delegation needs a JWT whose ``sub`` is the mailbox, signed by the service account.
   With no key, IAM Credentials ``signJwt`` signs it; google-auth has no public call for that (its
   ``iam.Signer`` signs blobs at a fixed host, and its ``signJwt`` helper is private), so the one
   POST is written here.
3. The signed JWT is redeemed at the OAuth token endpoint (RFC 7523 JWT bearer grant), as a keyed
   service account's would be.

Every failure leaves as a classified ``TokenError``; no token or JWT is logged or put in an error.
"""

from __future__ import annotations

import json
import time
from typing import Any

import requests

from mailbroker.errors import TokenError, TokenUnavailable, classify_token_error
from mailbroker.integrations import GoogleServiceAccountIntegration, context_of
from mailbroker.tokens.model import IssuedToken
from mailbroker.tokens.web_identity import JWT_TOKEN_TYPE, WebIdentityTokens, subject_token_supplier

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# A delegation assertion lives as long as Google allows one (an hour); it is used at once.
ASSERTION_LIFETIME = 3600


class KeylessServiceAccount:
    """One token for ``integration.subject``, from the function's AWS identity alone."""

    def __init__(
        self, integration: GoogleServiceAccountIntegration, tokens: WebIdentityTokens, session: Any
    ) -> None:
        assert integration.workload_identity is not None
        self._integration = integration
        self._workload = integration.workload_identity
        self._tokens = tokens
        self._session = session

    def fetch(self) -> IssuedToken:
        service_token = self._service_account_token()
        assertion = self._sign_delegation(service_token)
        return self._redeem(assertion)

    # 1. STS exchange and impersonation (google-auth)

    def _service_account_token(self) -> str:
        from google.auth import exceptions, identity_pool
        from google.auth.transport.requests import Request

        workload = self._workload
        creds = identity_pool.Credentials(
            audience=workload.audience,
            subject_token_type=JWT_TOKEN_TYPE,
            token_url=workload.sts_endpoint,
            subject_token_supplier=subject_token_supplier(self._tokens, workload.token_audience),
            service_account_impersonation_url=self._iam_url("generateAccessToken"),
            scopes=[CLOUD_PLATFORM_SCOPE],
        )
        try:
            creds.refresh(Request(session=self._session))
        except exceptions.OAuthError as exc:
            raise self._sts_refusal(exc) from None
        except exceptions.RefreshError as exc:
            raise self._iam_refusal(exc, "generateAccessToken") from None
        except (exceptions.TransportError, requests.RequestException, OSError) as exc:
            raise TokenUnavailable(f"Google STS or IAM could not be reached: {type(exc).__name__}") from None
        return str(creds.token)

    def _sts_refusal(self, exc: Exception) -> TokenError:
        body = self._session.last_error
        return classify_token_error(
            status=self._session.last_status,
            error=body.get("error") or "invalid_grant",
            description=body.get("error_description") or str(exc),
            retry_after=self._session.last_retry_after,
            provider="google_workload_identity",
            context=context_of(self._integration),
        )

    def _iam_refusal(self, exc: Exception, method: str) -> TokenError:
        status = self._session.last_status
        if status is not None and (status >= 500 or status == 429):
            return TokenUnavailable(f"Google IAM Credentials {method} failed with HTTP {status}")
        if status == 403 or "PERMISSION_DENIED" in str(exc):
            permission = "signJwt" if method == "signJwt" else "getAccessToken"
            return TokenError(
                f"Google IAM denied iam.serviceAccounts.{permission} on {self._workload.service_account} "
                "(PERMISSION_DENIED)",
                code="token_impersonation_denied",
            )
        if status is not None and status < 400:
            # The exchange at Google's STS failed in a way google-auth reports as a refresh error.
            return self._sts_refusal(exc)
        return TokenError(
            f"Google IAM Credentials {method} answered HTTP {status}", code="token_impersonation_denied"
        )

    # 2. signJwt (by hand: see the module's docstring)

    def _sign_delegation(self, service_token: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self._workload.service_account,
            "sub": self._integration.subject,
            "scope": self._integration.scope,
            "aud": self._integration.effective_token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        try:
            response = self._session.post(
                self._iam_url("signJwt"),
                json={"payload": json.dumps(claims)},
                headers={"Authorization": f"Bearer {service_token}"},
            )
        except (requests.RequestException, OSError) as exc:
            raise TokenUnavailable(
                f"Google IAM Credentials could not be reached: {type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise self._iam_refusal(RuntimeError(_google_status(response)), "signJwt")
        try:
            return str(response.json()["signedJwt"])
        except (ValueError, KeyError, TypeError):
            raise TokenUnavailable("Google IAM Credentials signJwt answered without a signed JWT") from None

    # 3. The JWT bearer grant

    def _redeem(self, assertion: str) -> IssuedToken:
        try:
            response = self._session.post(
                self._integration.effective_token_uri,
                data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion},
            )
        except (requests.RequestException, OSError) as exc:
            raise TokenUnavailable(
                f"Google's token endpoint could not be reached: {type(exc).__name__}"
            ) from None
        body = _json(response)
        if response.status_code == 200 and isinstance(body.get("access_token"), str):
            return IssuedToken(body["access_token"], float(body.get("expires_in") or 3600))
        raise classify_token_error(
            status=response.status_code,
            error=body.get("error") if isinstance(body.get("error"), str) else None,
            description=str(body.get("error_description") or ""),
            retry_after=self._session.last_retry_after,
            provider="google_service_account",
            context=context_of(self._integration),
        )

    def _iam_url(self, method: str) -> str:
        base = self._workload.iamcredentials_endpoint
        return f"{base}/v1/projects/-/serviceAccounts/{self._workload.service_account}:{method}"


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _google_status(response: Any) -> str:
    error = _json(response).get("error")
    return str(error.get("status") or "") if isinstance(error, dict) else ""
