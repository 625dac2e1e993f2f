"""Google workload identity federation, stood in on loopback: Google's STS and IAM Credentials.

- ``POST /v1/token``: the RFC 8693 token exchange of Google's STS. The subject token must be a JWT
  from the provider's issuer (verified against the keys of its OIDC discovery document, fetched
  over verified TLS), whose ``aud`` is one the provider allows (by default its resource name, with
  or without ``https:``) and whose subject passes the attribute condition (``allowed_subjects``).
  Google's words: ``invalid_target`` for an unknown provider, ``invalid_grant`` otherwise.
- ``POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken``: the federated principal
  impersonates the service account if it holds Workload Identity User on it.
- ``POST /v1/projects/-/serviceAccounts/{email}:signJwt``: the service account signs a JWT with its
  system-managed key if the caller holds Token Creator on it (``sign_jwt_allowed``).

The service account's key lives only here; its public half is registered with the sandbox token
endpoint (``TokenServer.register_service_account``), which redeems the signed assertion for a
mailbox as for any service account, checking domain-wide delegation (``allowed_subjects``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from mailbroker_sandbox.ca import SandboxCA
from mailbroker_sandbox.federated_credentials import get_json
from mailbroker_sandbox.web_identity import LoopbackHTTPS, Reply, Request

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
_IAM_PATH = re.compile(
    r"/v1/projects/-/serviceAccounts/(?P<email>[^/:]+):(?P<method>generateAccessToken|signJwt)"
)
_SKEW = 30


@dataclass
class WorkloadProvider:
    """A workload identity pool provider (OIDC)."""

    name: str  # //iam.googleapis.com/projects/<n>/locations/global/workloadIdentityPools/<p>/providers/<id>
    issuer: str
    allowed_audiences: tuple[str, ...] = ()  # empty: the provider's name, with or without https:
    allowed_subjects: frozenset[str] | None = None  # the attribute condition; None accepts any

    @property
    def pool(self) -> str:
        return self.name.split("/providers/")[0].removeprefix("//iam.googleapis.com/")

    def accepts_audience(self, audience: Any) -> bool:
        given = {audience} if isinstance(audience, str) else set(audience or [])
        allowed = set(self.allowed_audiences) or {self.name, "https:" + self.name}
        return bool(given & allowed)


@dataclass
class _KeylessAccount:
    email: str
    private_key: Any = field(repr=False)
    key_id: str
    workload_users: set[str] = field(default_factory=set)  # principals that may impersonate
    sign_jwt_allowed: bool = True


@dataclass
class _Issued:
    principal: str  # the federated principal, or the service account's email
    expires_at: float


class GoogleFederation:
    """Google's STS and IAM Credentials API on one loopback HTTPS port."""

    def __init__(self, ca: SandboxCA, token_server: Any, *, lifetime: float = 3600.0) -> None:
        self._token_server = token_server
        self._tls: ssl.SSLContext = ca.client_context()
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._providers: dict[str, WorkloadProvider] = {}
        self._accounts: dict[str, _KeylessAccount] = {}
        self._tokens: dict[str, _Issued] = {}
        self.exchanges = 0
        self.signed = 0
        self._server = LoopbackHTTPS(ca, self._route, "sandbox-google-federation")

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def sts_endpoint(self) -> str:
        return f"{self.base_url}/v1/token"

    @property
    def iamcredentials_endpoint(self) -> str:
        return self.base_url

    def start(self) -> GoogleFederation:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> GoogleFederation:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset_counts(self) -> None:
        with self._lock:
            self.exchanges = 0
            self.signed = 0

    # registration

    def register_provider(
        self,
        name: str,
        issuer: str,
        *,
        allowed_audiences: tuple[str, ...] = (),
        allowed_subjects: set[str] | None = None,
    ) -> WorkloadProvider:
        provider = WorkloadProvider(
            name, issuer, allowed_audiences, None if allowed_subjects is None else frozenset(allowed_subjects)
        )
        with self._lock:
            self._providers[name] = provider
        return provider

    def register_service_account(
        self,
        email: str,
        *,
        workload_users: set[str] = frozenset(),  # type: ignore[assignment]
        delegated_subjects: set[str] | None = None,
        sign_jwt_allowed: bool = True,
    ) -> None:
        """A service account with no user-managed key; ``delegated_subjects`` None means
        domain-wide delegation for anyone, an empty set none."""
        info = self._token_server.register_service_account(
            client_email=email, allowed_subjects=delegated_subjects
        )
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        with self._lock:
            self._accounts[email.lower()] = _KeylessAccount(
                email, key, info["private_key_id"], set(workload_users), sign_jwt_allowed
            )

    def allow_sign_jwt(self, email: str, allowed: bool) -> None:
        with self._lock:
            self._accounts[email.lower()].sign_jwt_allowed = allowed

    @staticmethod
    def principal(provider: WorkloadProvider, subject: str) -> str:
        return f"principal://iam.googleapis.com/{provider.pool}/subject/{subject}"

    # routing

    def _route(self, req: Request) -> Reply:
        if req.method == "POST" and req.path == "/v1/token":
            return self._exchange(req)
        match = _IAM_PATH.fullmatch(req.path)
        if req.method == "POST" and match:
            return self._iam(req, match["email"], match["method"])
        return Reply.of_json(404, {"error": {"code": 404, "message": "Not Found", "status": "NOT_FOUND"}})

    def _exchange(self, req: Request) -> Reply:
        form = req.form()
        if form.get("grant_type") != TOKEN_EXCHANGE or not form.get("subject_token"):
            return _oauth_error("invalid_request", "Invalid grant_type or missing subject_token.")
        with self._lock:
            provider = self._providers.get(form.get("audience", ""))
        if provider is None:
            return _oauth_error(
                "invalid_target",
                'The target service indicated by the "audience" parameters is invalid. This might either '
                "be because the pool or provider is disabled or deleted or because it doesn't exist.",
            )
        try:
            claims = self._verified(form["subject_token"], provider)
        except _Refused as refused:
            return _oauth_error("invalid_grant", str(refused))
        subject = str(claims.get("sub") or "")
        if provider.allowed_subjects is not None and subject not in provider.allowed_subjects:
            return _oauth_error(
                "invalid_grant", "The given credential is rejected by the attribute condition."
            )
        token = self._issue(self.principal(provider, subject))
        with self._lock:
            self.exchanges += 1
        return Reply.of_json(
            200,
            {
                "access_token": token,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
                "expires_in": int(self.lifetime),
            },
        )

    def _verified(self, subject_token: str, provider: WorkloadProvider) -> dict[str, Any]:
        try:
            unverified = jwt.decode(subject_token, options={"verify_signature": False})
            kid = str(jwt.get_unverified_header(subject_token).get("kid") or "")
        except jwt.InvalidTokenError:
            raise _Refused("Unable to parse the ID Token.") from None
        if unverified.get("iss") != provider.issuer:
            raise _Refused(
                f"The issuer in ID Token {unverified.get('iss')} does not match the expected ISSUER "
                f"{provider.issuer}."
            )
        if not provider.accepts_audience(unverified.get("aud")):
            raise _Refused(
                f"The audience in ID Token [{unverified.get('aud')}] does not match the expected audience."
            )
        try:
            discovery = get_json(f"{provider.issuer.rstrip('/')}/.well-known/openid-configuration", self._tls)
            keys = get_json(str(discovery["jwks_uri"]), self._tls).get("keys", [])
            jwk = next(k for k in keys if k.get("kid") == kid)
            return dict(
                jwt.decode(
                    subject_token,
                    jwt.PyJWK(jwk).key,
                    algorithms=["RS256"],
                    options={"verify_aud": False, "require": ["iss", "sub", "exp"]},
                    leeway=_SKEW,
                )
            )
        except (OSError, ValueError, KeyError, StopIteration, jwt.PyJWKError):
            raise _Refused(
                "Unable to verify the ID Token signature: no matching key at the issuer."
            ) from None
        except jwt.ExpiredSignatureError:
            raise _Refused("ID Token has expired.") from None
        except jwt.InvalidTokenError:
            raise _Refused("Invalid ID Token signature.") from None

    def _iam(self, req: Request, email: str, method: str) -> Reply:
        with self._lock:
            caller = self._tokens.get(req.bearer())
            account = self._accounts.get(email.lower())
        if caller is None or caller.expires_at < time.time():
            return _google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        permission = "getAccessToken" if method == "generateAccessToken" else "signJwt"
        allowed = account is not None and (
            caller.principal in account.workload_users
            if method == "generateAccessToken"
            else caller.principal.lower() == account.email.lower() and account.sign_jwt_allowed
        )
        if account is None or not allowed:
            return _google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'iam.serviceAccounts.{permission}' denied on resource (or it may not exist).",
            )
        if method == "generateAccessToken":
            token = self._issue(account.email)
            expires = dt.datetime.fromtimestamp(time.time() + self.lifetime, dt.UTC)
            return Reply.of_json(
                200, {"accessToken": token, "expireTime": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
            )
        try:
            payload = json.loads(str(req.json().get("payload") or ""))
        except ValueError:
            return _google_error(400, "INVALID_ARGUMENT", "Invalid JWT payload.")
        signed = jwt.encode(payload, account.private_key, algorithm="RS256", headers={"kid": account.key_id})
        with self._lock:
            self.signed += 1
        return Reply.of_json(200, {"keyId": account.key_id, "signedJwt": signed})

    def _issue(self, principal: str) -> str:
        token = "ya29.d.sandbox-" + secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[token] = _Issued(principal, time.time() + self.lifetime)
        return token


class _Refused(Exception):
    pass


def _oauth_error(error: str, description: str) -> Reply:
    return Reply.of_json(400, {"error": error, "error_description": description})


def _google_error(status: int, reason: str, message: str) -> Reply:
    return Reply.of_json(status, {"error": {"code": status, "message": message, "status": reason}})
