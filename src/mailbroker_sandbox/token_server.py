"""Loopback stand-ins for the providers' OAuth2 token endpoints, over HTTPS.

One threaded HTTPS server on 127.0.0.1 answers the way the real providers do, so that the real
client libraries (MSAL, google-auth, requests-oauthlib) work against it unchanged but for their
endpoint URL and trusting the sandbox CA:

* Microsoft Entra ID (``login.microsoftonline.com``): tenant OIDC discovery, JWKS, and the v2.0
  token endpoint's client-credentials grant, issuing RS256 JWTs shaped like Entra's.
* Google (``oauth2.googleapis.com`` / ``accounts.google.com``): the refresh-token grant, the
  JWT-bearer grant of service accounts with domain-wide delegation, the authorisation-code flow
  with PKCE, and token revocation.
* A generic RFC 6749 §4.4 client-credentials endpoint with opaque tokens.
* RFC 7662 introspection of every token issued, which the sandbox SMTP server uses to verify
  XOAUTH2 bearer tokens.

Tests count what was issued and inject faults (5xx, 429, timeouts, revoked grants, rejected
clients). Tokens and secrets are never logged; only client ids and outcomes are, at DEBUG.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from mailbroker.integrations import DEFAULT_GOOGLE_TOKEN_URI, GOOGLE_MAIL_SCOPE, is_loopback_host

from mailbroker_sandbox.ca import SandboxCA
from mailbroker_sandbox.client_assertions import (
    ASSERTION_TYPE,
    AssertionRefused,
    RegisteredCertificate,
    SeenAssertions,
    verify_client_assertion,
)
from mailbroker_sandbox.federated_credentials import (
    FederatedCredential,
    is_federated_assertion,
    verify_federated_assertion,
)
from mailbroker_sandbox.https import LoopbackHTTPSServer, SandboxRequestHandler

_log = logging.getLogger(__name__)

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRAPH_RESOURCE = "https://graph.microsoft.com"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
FAULT_KINDS = frozenset({"500", "429", "timeout", "invalid_grant", "invalid_client"})
SANDBOX_PROJECT = "mailbroker-sandbox"
DEFAULT_CONSENT_USER = "sandbox.user@example.com"

_MS_DISCOVERY = re.compile(r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration")
_MS_KEYS = re.compile(r"/(?P<tenant>[^/]+)/discovery/v2\.0/keys")
_MS_TOKEN = re.compile(r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token")
# What Entra looks a tenant up by: a GUID, or a domain name; the sandbox's own registered names
# ("contoso") are looked up before this is consulted.
_TENANT_NAME = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}"
)
_MS_DEVICE_CODE = re.compile(r"/(?P<tenant>[^/]+)/oauth2/v2\.0/devicecode")
_MS_AUTHORIZE = re.compile(r"/(?P<tenant>[^/]+)/oauth2/v2\.0/authorize")
_OIDC_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})
_DEVICE_CODE_LIFETIME = 900.0
_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")

_MAX_BODY = 64 * 1024
_SOCKET_TIMEOUT = 10.0
_AUTH_CODE_LIFETIME = 600.0
_ASSERTION_MAX_LIFETIME = 3600
_CLOCK_SKEW = 30


# --- registrations and issued tokens --------------------------------------------------------------


@dataclass
class _MicrosoftApp:
    tenant_id: str
    client_id: str
    client_secret: str | None = field(repr=False)
    roles: tuple[str, ...]
    audience: str
    object_id: str  # the Enterprise application's (service principal's) Object ID: the token's oid
    secret_expires_at: float | None = None
    application_object_id: str = ""  # the App registration's Object ID, a different GUID
    graph_roles: tuple[str, ...] = ("Mail.Send",)  # Microsoft Graph application permissions granted
    certificates: tuple[RegisteredCertificate, ...] = ()
    public_client: bool = False  # "Allow public client flows": delegated grants without a credential
    federated: tuple[FederatedCredential, ...] = ()  # workload identity federation


@dataclass
class _MsRefreshGrant:
    tenant_id: str
    client_id: str
    user: str
    scope: str


@dataclass
class _DeviceCode:
    tenant_id: str
    client_id: str
    scope: str
    user_code: str
    expires_at: float
    polls: int = 0


@dataclass
class _GoogleClient:
    client_id: str
    client_secret: str = field(repr=False)
    redirect_uris: frozenset[str] = frozenset()
    testing: bool = False  # consent screen in 'Testing': refresh tokens last 7 days


TESTING_REFRESH_LIFETIME = 7 * 86400


@dataclass
class _RefreshGrant:
    grant_id: str  # the refresh token's digest
    client_id: str
    user: str
    scope: str
    expires_at: float | None = None


@dataclass
class _ServiceAccount:
    client_email: str
    client_id: str
    key_id: str
    public_key: rsa.RSAPublicKey = field(repr=False)
    allowed_subjects: frozenset[str] | None


@dataclass
class _OAuth2Client:
    client_id: str
    client_secret: str = field(repr=False)
    scope: str


@dataclass
class _AuthCode:
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    offline: bool
    challenge: str | None
    challenge_method: str
    expires_at: float


@dataclass(frozen=True)
class _Issued:
    """What the server remembers about one access token (keyed by its digest, never by itself)."""

    provider: str
    client_id: str
    subject: str | None
    scope: str
    issued_at: float
    expires_at: float
    audience: str | None = None
    roles: tuple[str, ...] = ()
    tenant_id: str | None = None
    grant_id: str | None = None  # the refresh grant it came from, for revocation
    object_id: str | None = None  # Microsoft: the service principal the token was issued to


@dataclass
class _Fault:
    kind: str
    remaining: int
    retry_after: int
    delay: float
    path_contains: str | None
    answer: _Answer | None = None


@dataclass(frozen=True)
class _Answer:
    """A provider's error answer, as a test gives it (``TokenServer.refuse_next``)."""

    status: int
    error: str
    description: str
    aadsts: int | None = None


# --- HTTP plumbing -----------------------------------------------------------------------------------


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    is_form: bool
    repeated: frozenset[str]
    headers: Message


@dataclass
class _Reply:
    status: int
    body: dict[str, Any] | list[Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: float | None = None  # say nothing, then close the connection after this many seconds
    html: str | None = None  # a page instead of JSON (the form_post response mode)


class _Refusal(Exception):
    """Stops request handling with a ready error reply."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


@dataclass(frozen=True)
class _ClientAuth:
    client_id: str | None
    client_secret: str | None = field(repr=False)
    basic: bool


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _numeric_date(moment: float) -> float:
    return round(moment, 3)


def _number(seconds: float) -> int | float:
    return int(seconds) if float(seconds).is_integer() else seconds


def _same_secret(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _pairs(text: str) -> tuple[dict[str, str], frozenset[str]]:
    values: dict[str, str] = {}
    repeated: set[str] = set()
    for name, value in parse_qsl(text, keep_blank_values=True):
        if name in values:
            repeated.add(name)
        values[name] = value
    return values, frozenset(repeated)


class _Handler(SandboxRequestHandler):
    server: _HTTPSServer
    server_version = "mailbroker-sandbox/1"
    timeout = _SOCKET_TIMEOUT

    def _serve(self, method: str) -> None:
        app = self.server.app
        path = urlsplit(self.path).path
        try:
            reply = app._handle(self._read(method))
        except _Refusal as refusal:
            reply = refusal.reply
        except Exception:
            _log.exception("sandbox token server failed on %s %s", method, path)
            reply = _Reply(500, {"error": "server_error", "error_description": "Internal error."})
        if reply.drop_after is not None:
            app._stopping.wait(reply.drop_after)
            self.close_connection = True
            _log.debug("%s %s -> dropped without an answer", method, path)
            return
        self._write(reply)

    def _read(self, method: str) -> _Request:
        parts = urlsplit(self.path)
        query, repeated = _pairs(parts.query)
        form: dict[str, str] = {}
        is_form = False
        if method == "POST":
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > _MAX_BODY:
                self.close_connection = True
                raise _Refusal(_Reply(413 if length > 0 else 400, {"error": "invalid_request"}))
            raw = self.rfile.read(length)
            is_form = self.headers.get_content_type() == "application/x-www-form-urlencoded"
            if is_form:
                form, repeated_form = _pairs(raw.decode("utf-8", "replace"))
                repeated = repeated | repeated_form
        return _Request(method, parts.path, query, form, is_form, repeated, self.headers)

    def _write(self, reply: _Reply) -> None:
        body = b"" if reply.body is None else json.dumps(reply.body).encode("utf-8")
        self.send_response(reply.status)
        if reply.html is not None:
            body = reply.html.encode("utf-8")
            self.send_header("Content-Type", "text/html; charset=utf-8")
        elif reply.body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        # Every answer, the stdlib's own error pages included, forbids caching (RFC 6749 §5.1).
        self.send_header("Cache-Control", "no-store")
        self.send_header("Pragma", "no-cache")
        super().end_headers()


class _HTTPSServer(LoopbackHTTPSServer):
    app: TokenServer


# --- the server ------------------------------------------------------------------------------------


class TokenServer:
    """The sandbox's Microsoft, Google and generic OAuth2 token endpoints on one HTTPS port.

    The socket is bound on construction (so ``base_url`` and the registration helpers work before
    ``start()``); ``start()`` serves it on a daemon thread and ``stop()`` closes it for good.
    """

    def __init__(self, ca: SandboxCA, *, lifetime: float = 3600.0) -> None:
        self.lifetime = lifetime
        self.consent_user = DEFAULT_CONSENT_USER  # who consents when no login_hint is given
        self.deny_consent = False  # the consent screen answers access_denied
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_der = self._signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._key_id = (
            base64.urlsafe_b64encode(hashlib.sha256(public_der).digest()[:20]).rstrip(b"=").decode()
        )
        self._ms_apps: dict[tuple[str, str], _MicrosoftApp] = {}
        self._ms_tenants: dict[str, str] = {}  # lower-case id -> id as registered
        self._google_clients: dict[str, _GoogleClient] = {}
        self._refresh_grants: dict[str, _RefreshGrant] = {}
        self._revoked_grants: set[str] = set()
        self._revoked_tokens: set[str] = set()
        self._service_accounts: dict[str, _ServiceAccount] = {}
        self._oauth2_clients: dict[str, _OAuth2Client] = {}
        self._auth_codes: dict[str, _AuthCode] = {}
        self._ms_auth_codes: dict[str, _AuthCode] = {}
        self._ms_device_codes: dict[str, _DeviceCode] = {}
        self._ms_refresh_grants: dict[str, _MsRefreshGrant] = {}
        self._ms_redeemed: set[str] = set()  # refresh tokens already exchanged (digests)
        self._ms_expired: set[str] = set()
        self._seen_assertions = SeenAssertions()
        self.refresh_token_reuse = 0  # redeemed refresh tokens presented again
        self._tokens: dict[str, _Issued] = {}
        self._issue_log: list[tuple[str, str, str | None]] = []
        self._request_count = 0
        self._faults: list[_Fault] = []
        self._issuer_tls = ca.client_context()  # how it fetches a federated issuer's keys
        self._httpd = _HTTPSServer(self, ca.server_context(), _Handler, socket_timeout=_SOCKET_TIMEOUT)
        self.base_url = f"https://127.0.0.1:{self._httpd.server_port}"

    # lifecycle

    def start(self) -> TokenServer:
        self._httpd.serve_in_background(f"sandbox-token-server-{self._httpd.server_port}")
        _log.debug("token server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        self._stopping.set()  # ends the waits of answers told to drop late
        self._httpd.close()

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TokenServer({self.base_url!r})"

    # well-known URLs

    @property
    def google_token_uri(self) -> str:
        return f"{self.base_url}/token"

    @property
    def authorization_url(self) -> str:
        return f"{self.base_url}/o/oauth2/auth"

    @property
    def revocation_url(self) -> str:
        return f"{self.base_url}/revoke"

    @property
    def oauth2_token_url(self) -> str:
        return f"{self.base_url}/oauth2/token"

    @property
    def tokeninfo_url(self) -> str:
        return f"{self.base_url}/tokeninfo"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    def microsoft_authority(self) -> str:
        """The authority host part; clients append ``/{tenant_id}``."""
        return self.base_url

    def microsoft_token_url(self, tenant_id: str) -> str:
        return f"{self.base_url}/{tenant_id}/oauth2/v2.0/token"

    def _ms_issuer(self, tenant_id: str) -> str:
        return f"{self.base_url}/{tenant_id}/v2.0"

    # registration

    def register_microsoft_app(
        self,
        tenant_id: str,
        client_id: str,
        client_secret: str | None = None,
        *,
        roles: Iterable[str] = ("SMTP.SendAsApp",),
        audience: str = "https://outlook.office.com",
        secret_expires_at: float | None = None,
        graph_roles: Iterable[str] = ("Mail.Send",),
        certificates: Iterable[str] = (),
        public_client: bool = False,
    ) -> None:
        """Register (or re-register with a new secret) an app in a tenant. ``secret_expires_at``
        (epoch seconds) makes the secret answer AADSTS7000222 once past. ``roles`` are the
        permissions its tokens for ``audience`` carry; ``graph_roles`` those of its tokens for
        Microsoft Graph (``https://graph.microsoft.com/.default``). ``certificates``: PEM
        certificates uploaded to the app, which verify its client assertions. ``public_client``
        lets delegated grants (refresh token, device code, authorisation code) go without a
        credential."""
        with self._lock:
            previous = self._ms_apps.get((tenant_id.lower(), client_id))
            self._ms_tenants.setdefault(tenant_id.lower(), tenant_id)
            self._ms_apps[(tenant_id.lower(), client_id)] = _MicrosoftApp(
                tenant_id=self._ms_tenants[tenant_id.lower()],
                client_id=client_id,
                client_secret=client_secret,
                roles=tuple(roles),
                audience=audience,
                object_id=previous.object_id if previous else str(uuid.uuid4()),
                secret_expires_at=secret_expires_at,
                application_object_id=previous.application_object_id if previous else str(uuid.uuid4()),
                graph_roles=tuple(graph_roles),
                certificates=tuple(RegisteredCertificate.from_pem(pem) for pem in certificates),
                public_client=public_client,
            )

    def microsoft_object_ids(self, tenant_id: str, client_id: str) -> tuple[str, str]:
        """(the App registration's Object ID, the Enterprise application's Object ID) of an app:
        Exchange's New-ServicePrincipal needs the second, the one in the token's ``oid``."""
        with self._lock:
            app = self._ms_apps[(tenant_id.lower(), client_id)]
        return app.application_object_id, app.object_id

    def add_microsoft_certificate(self, tenant_id: str, client_id: str, certificate_pem: str) -> None:
        """Upload one more certificate to a registered app (Certificates & secrets > Upload)."""
        with self._lock:
            app = self._ms_apps[(tenant_id.lower(), client_id)]
            app.certificates = (*app.certificates, RegisteredCertificate.from_pem(certificate_pem))

    def add_microsoft_federated_credential(
        self,
        tenant_id: str,
        client_id: str,
        *,
        issuer: str,
        subject: str,
        audience: str = "api://AzureADTokenExchange",
    ) -> None:
        """Add a federated identity credential to a registered app (Certificates & secrets >
        Federated credentials > Other issuer)."""
        with self._lock:
            app = self._ms_apps[(tenant_id.lower(), client_id)]
            credential = FederatedCredential(issuer=issuer, subject=subject, audiences=(audience,))
            app.federated = (*app.federated, credential)

    def issue_microsoft_refresh_token(
        self,
        tenant_id: str,
        client_id: str,
        user: str,
        *,
        scope: str = "https://outlook.office.com/SMTP.Send",
    ) -> str:
        """A delegated refresh token, as if ``user`` had consented to ``scope`` for the app."""
        with self._lock:
            app = self._ms_apps.get((tenant_id.lower(), client_id))
            if app is None:
                raise ValueError(f"no Microsoft app {client_id!r} in tenant {tenant_id!r}")
            return self._new_ms_refresh_token(app, user, scope)

    def expire_microsoft_refresh_tokens(self, client_id: str) -> int:
        """Expire every live delegated refresh token of ``client_id`` (90 days idle: AADSTS700082)."""
        with self._lock:
            gone = [d for d, g in self._ms_refresh_grants.items() if g.client_id == client_id]
            for digest in gone:
                del self._ms_refresh_grants[digest]
                self._ms_expired.add(digest)
            return len(gone)

    def live_microsoft_refresh_tokens(self, client_id: str) -> int:
        with self._lock:
            return sum(1 for g in self._ms_refresh_grants.values() if g.client_id == client_id)

    def register_google_client(
        self, client_id: str, client_secret: str, *, redirect_uris: Iterable[str] = (), testing: bool = False
    ) -> None:
        """Register an OAuth client. Loopback ``http`` redirect URIs are always accepted (as for
        Google's desktop clients); ``redirect_uris`` adds exact others. ``testing``: its consent
        screen is in 'Testing', so its refresh tokens end after 7 days, and token answers carry
        ``refresh_token_expires_in``."""
        with self._lock:
            self._google_clients[client_id] = _GoogleClient(
                client_id, client_secret, frozenset(redirect_uris), testing
            )

    def issue_refresh_token(self, client_id: str, user_email: str, *, scope: str = GOOGLE_MAIL_SCOPE) -> str:
        """A refresh token, as if ``user_email`` had consented to ``scope`` for ``client_id``."""
        with self._lock:
            if client_id not in self._google_clients:
                raise ValueError(f"no Google client {client_id!r} is registered")
            return self._new_refresh_token(client_id, user_email, scope)

    def _new_refresh_token(self, client_id: str, user: str, scope: str) -> str:
        token = "1//0" + secrets.token_urlsafe(72)
        grant_id = _digest(token)
        client = self._google_clients.get(client_id)
        ends = time.time() + TESTING_REFRESH_LIFETIME if client is not None and client.testing else None
        self._refresh_grants[grant_id] = _RefreshGrant(grant_id, client_id, user, scope, ends)
        return token

    def revoke_refresh_token(self, refresh_token: str) -> None:
        """Revoke a refresh token and every access token minted from it (like a user removing
        the app's access, or Google expiring a Testing-mode grant)."""
        with self._lock:
            self._revoke_grant(_digest(refresh_token))

    def _revoke_grant(self, grant_id: str) -> None:
        self._refresh_grants.pop(grant_id, None)
        self._revoked_grants.add(grant_id)

    def register_service_account(
        self, *, client_email: str | None = None, allowed_subjects: Iterable[str] | None = None
    ) -> dict[str, str]:
        """Create a service account with a fresh RSA key and return its JSON key object, as the
        Cloud console would. ``allowed_subjects`` None means domain-wide delegation for anyone."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = client_email or f"sandbox-{secrets.token_hex(4)}@{SANDBOX_PROJECT}.iam.gserviceaccount.com"
        account = _ServiceAccount(
            client_email=email,
            client_id=str(10**20 + secrets.randbelow(9 * 10**20)),
            key_id=secrets.token_hex(20),
            public_key=key.public_key(),
            allowed_subjects=None
            if allowed_subjects is None
            else frozenset(s.lower() for s in allowed_subjects),
        )
        with self._lock:
            self._service_accounts[email.lower()] = account
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
        return {
            "type": "service_account",
            "project_id": SANDBOX_PROJECT,
            "private_key_id": account.key_id,
            "private_key": private_pem,
            "client_email": email,
            "client_id": account.client_id,
            "auth_uri": self.authorization_url,
            "token_uri": self.google_token_uri,
            "auth_provider_x509_cert_url": f"{self.base_url}/oauth2/v1/certs",
            "client_x509_cert_url": f"{self.base_url}/robot/v1/metadata/x509/{email}",
            "universe_domain": "googleapis.com",
        }

    def register_oauth2_client(self, client_id: str, client_secret: str, *, scope: str) -> None:
        with self._lock:
            self._oauth2_clients[client_id] = _OAuth2Client(client_id, client_secret, scope)

    # observation

    def introspect(self, token: str) -> dict[str, Any] | None:
        """What the server knows about an access token it issued (None if it issued no such token)."""
        with self._lock:
            record = self._tokens.get(_digest(token))
            if record is None:
                return None
            revoked = _digest(token) in self._revoked_tokens or record.grant_id in self._revoked_grants
        return {
            "active": not revoked and time.time() < record.expires_at,
            "provider": record.provider,
            "client_id": record.client_id,
            "sub": record.subject,
            "scope": record.scope,
            "token_type": "Bearer",
            "iat": int(record.issued_at),
            "exp": _numeric_date(record.expires_at),
            "aud": record.audience,
            "roles": list(record.roles),
            "tid": record.tenant_id,
            "oid": record.object_id,
        }

    def issued(
        self, *, provider: str | None = None, client_id: str | None = None, subject: str | None = None
    ) -> int:
        """How many access tokens were issued (since the last ``reset_counts``) matching all filters."""
        with self._lock:
            return sum(
                1
                for p, c, s in self._issue_log
                if (provider is None or p == provider)
                and (client_id is None or c == client_id)
                and (subject is None or (s or "").lower() == subject.lower())
            )

    @property
    def requests(self) -> int:
        """Token-endpoint requests received since the last ``reset_counts``, whatever their outcome."""
        with self._lock:
            return self._request_count

    def reset_counts(self) -> None:
        with self._lock:
            self._request_count = 0
            self._issue_log.clear()

    # faults

    def fail_next(
        self,
        kind: str,
        *,
        times: int = 1,
        retry_after: int = 2,
        delay: float = 5.0,
        path_contains: str | None = None,
    ) -> None:
        """Make the next ``times`` token requests (whose path contains ``path_contains``, if given)
        fail as ``kind``: "500", "429" (with Retry-After), "timeout" (wait ``delay`` seconds, then
        close without answering), "invalid_grant" or "invalid_client" (each in the provider's words)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.append(_Fault(kind, times, retry_after, delay, path_contains))

    def refuse_next(
        self,
        status: int,
        error: str,
        description: str,
        *,
        aadsts: int | None = None,
        times: int = 1,
        path_contains: str | None = None,
    ) -> None:
        """Answer the next ``times`` token requests (whose path contains ``path_contains``) with a
        provider's own error: ``status`` and the RFC 6749 ``error`` and ``error_description``. On the
        Microsoft endpoints, ``aadsts`` makes it Entra's shape (``AADSTS<n>: `` before the
        description, ``error_codes``, trace and correlation ids)."""
        if not 400 <= status <= 599:
            raise ValueError("an error answer's status must be 4xx or 5xx")
        if times < 1:
            raise ValueError("times must be at least 1")
        answer = _Answer(status, error, description, aadsts)
        with self._lock:
            self._faults.append(_Fault("answer", times, 0, 0.0, path_contains, answer))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.path_contains is None or fault.path_contains in path:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    # routing

    # One branch per route the stand-in serves, read top to bottom like a route table.
    def _handle(self, req: _Request) -> _Reply:  # noqa: C901
        if req.method == "GET":
            if match := _MS_DISCOVERY.fullmatch(req.path):
                return self._ms_openid_configuration(match["tenant"])
            if match := _MS_KEYS.fullmatch(req.path):
                return self._ms_keys(match["tenant"])
            if req.path == "/o/oauth2/auth":
                return self._google_authorize(req)
            if req.path == "/tokeninfo":
                return self._google_tokeninfo(req)
            if match := _MS_AUTHORIZE.fullmatch(req.path):
                return self._ms_authorize(req, match["tenant"])
        elif req.method == "POST":
            if match := _MS_TOKEN.fullmatch(req.path):
                return self._token_request(req, "microsoft", match["tenant"])
            if match := _MS_DEVICE_CODE.fullmatch(req.path):
                return self._ms_device_code_request(req, match["tenant"])
            if req.path == "/token":
                return self._token_request(req, "google", None)
            if req.path == "/oauth2/token":
                return self._token_request(req, "oauth2", None)
            if req.path == "/introspect":
                return self._introspect_request(req)
            if req.path == "/tokeninfo":
                return self._google_tokeninfo(req)
            if req.path == "/revoke":
                return self._revoke_request(req)
        return _Reply(404, {"error": "not_found"})

    def _token_request(self, req: _Request, provider: str, tenant: str | None) -> _Reply:
        with self._lock:
            self._request_count += 1
            fault = self._take_fault(req.path)
        if fault is not None:
            _log.debug("token request on %s answered with injected fault %s", req.path, fault.kind)
            return self._fault_reply(fault, provider, req)
        if not req.is_form or req.repeated:
            problem = (
                "The request body must be application/x-www-form-urlencoded."
                if not req.is_form
                else f"Parameter {sorted(req.repeated)[0]!r} was included more than once."
            )
            raise _Refusal(self._invalid_request(provider, problem, req))
        if provider == "microsoft":
            assert tenant is not None
            return self._microsoft_token(req, tenant)
        if provider == "google":
            return self._google_token(req)
        return self._oauth2_token(req)

    def _invalid_request(self, provider: str, text: str, req: _Request) -> _Reply:
        if provider == "microsoft":
            return self._ms_error(400, "invalid_request", 900144, text, req)
        return _Reply(400, {"error": "invalid_request", "error_description": text})

    # One branch per kind of injected fault, each the reply that provider gives for it.
    def _fault_reply(self, fault: _Fault, provider: str, req: _Request) -> _Reply:  # noqa: C901
        if fault.answer is not None:
            answer = fault.answer
            if provider == "microsoft" and answer.aadsts is not None:
                return self._ms_error(answer.status, answer.error, answer.aadsts, answer.description, req)
            return _Reply(answer.status, {"error": answer.error, "error_description": answer.description})
        if fault.kind == "timeout":
            return _Reply(0, drop_after=fault.delay)
        if fault.kind == "500":
            return _Reply(500, {"error": "server_error", "error_description": "Internal error; retry later."})
        if fault.kind == "429":
            return _Reply(
                429,
                {
                    "error": "temporarily_unavailable",
                    "error_description": f"Too many requests; retry after {fault.retry_after} seconds.",
                },
                headers={"Retry-After": str(fault.retry_after)},
            )
        client_id = req.form.get("client_id") or "unknown"
        if fault.kind == "invalid_grant":
            if provider == "microsoft":
                return self._ms_error(
                    400, "invalid_grant", 70000, "The provided grant is invalid or malformed.", req
                )
            if provider == "google":
                return _Reply(
                    400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
                )
            return _Reply(
                400, {"error": "invalid_grant", "error_description": "The grant is invalid or expired."}
            )
        if provider == "microsoft":
            return self._ms_invalid_secret(client_id, req)
        if provider == "google":
            return _Reply(401, {"error": "invalid_client", "error_description": "Unauthorized"})
        return _Reply(
            401,
            {"error": "invalid_client", "error_description": "Client authentication failed."},
            headers={"WWW-Authenticate": 'Basic realm="sandbox"'},
        )

    def _client_auth(self, req: _Request, refuse: Any) -> _ClientAuth:
        """Client credentials from HTTP Basic (RFC 6749 §2.3.1) or the form; using both is an error.
        ``refuse(text)`` builds the provider's invalid_request reply."""
        header = req.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return _ClientAuth(req.form.get("client_id"), req.form.get("client_secret"), basic=False)
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise _Refusal(refuse("The Authorization header is not valid HTTP Basic.")) from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise _Refusal(refuse("The Authorization header is not valid HTTP Basic."))
        client_id, client_secret = unquote_plus(user), unquote_plus(password)
        if "client_secret" in req.form:
            raise _Refusal(refuse("Only one client authentication method may be used."))
        if req.form.get("client_id") not in (None, client_id):
            raise _Refusal(refuse("The client_id in the body does not match the Authorization header."))
        return _ClientAuth(client_id, client_secret, basic=True)

    def _record(self, token: str, issued: _Issued) -> None:
        with self._lock:
            self._tokens[_digest(token)] = issued
            self._issue_log.append((issued.provider, issued.client_id, issued.subject))
        _log.debug("issued a %s access token to client %s", issued.provider, issued.client_id)

    def _expiry(self) -> tuple[float, float, float]:
        lifetime = float(self.lifetime)
        now = time.time()
        return now, now + lifetime, lifetime

    # Microsoft Entra ID

    def _ms_error(self, status: int, error: str, code: int, text: str, req: _Request | None) -> _Reply:
        """An Entra ID error body: AADSTS code in the description and in ``error_codes``."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id = str(uuid.uuid4())
        correlation_id = (req.headers.get("client-request-id") if req else None) or str(uuid.uuid4())
        return _Reply(
            status,
            {
                "error": error,
                "error_description": (
                    f"AADSTS{code}: {text} Trace ID: {trace_id} Correlation ID: {correlation_id} "
                    f"Timestamp: {stamp}"
                ),
                "error_codes": [code],
                "timestamp": stamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": f"{self.base_url}/error?code={code}",
            },
            headers={"client-request-id": correlation_id},
        )

    def _ms_invalid_secret(self, client_id: str, req: _Request) -> _Reply:
        return self._ms_error(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client "
            f"secret value, not the client secret ID, for a secret added to app '{client_id}'.",
            req,
        )

    def _ms_tenant(self, tenant: str) -> str | None:
        with self._lock:
            return self._ms_tenants.get(tenant.lower())

    def _ms_unknown_tenant(self, tenant: str, req: _Request | None, error: str = "invalid_request") -> _Reply:
        if not _TENANT_NAME.fullmatch(tenant):
            # Neither a GUID nor a domain name: Entra says so instead of "not found".
            return self._ms_error(
                400,
                error,
                900023,
                f"Specified tenant identifier '{tenant}' is neither a valid DirectoryName nor a valid "
                "external domain.",
                req,
            )
        return self._ms_error(
            400,
            error,
            90002,
            f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
            "signing into the correct cloud.",
            req,
        )

    def _ms_openid_configuration(self, tenant: str) -> _Reply:
        tenant_id = self._ms_tenant(tenant)
        if tenant_id is None:
            return self._ms_unknown_tenant(tenant, None, error="invalid_tenant")
        base = f"{self.base_url}/{tenant_id}"
        return _Reply(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": self._ms_issuer(tenant_id),
                "request_uri_parameter_supported": False,
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub",
                    "iss",
                    "aud",
                    "exp",
                    "iat",
                    "nbf",
                    "tid",
                    "oid",
                    "roles",
                    "appid",
                ],
                "kerberos_endpoint": f"{base}/kerberos",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            },
        )

    def _ms_keys(self, tenant: str) -> _Reply:
        if self._ms_tenant(tenant) is None:
            return self._ms_unknown_tenant(tenant, None, error="invalid_tenant")
        return _Reply(200, {"keys": [self.signing_jwk()]})

    def signing_jwk(self) -> dict[str, Any]:
        """The public JWK that verifies the Microsoft-style access tokens."""
        jwk = dict(RSAAlgorithm.to_jwk(self._signing_key.public_key(), as_dict=True))
        jwk.update({"use": "sig", "kid": self._key_id, "x5t": self._key_id, "alg": "RS256"})
        return jwk

    # Entra ID's refusals in the order it checks them, each one early return with its AADSTS code.
    def _microsoft_token(self, req: _Request, tenant: str) -> _Reply:
        form = req.form
        grant_type = form.get("grant_type")
        if not grant_type:
            return self._ms_error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
                req,
            )
        grants = {
            "client_credentials": self._ms_client_credentials,
            "refresh_token": self._ms_refresh,
            "authorization_code": self._ms_code_exchange,
            DEVICE_CODE_GRANT: self._ms_device_code_grant,
        }
        if grant_type not in grants:
            return self._ms_error(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
                req,
            )
        tenant_id = self._ms_tenant(tenant)
        if tenant_id is None:
            return self._ms_unknown_tenant(tenant, req)
        auth = self._client_auth(req, lambda text: self._ms_error(400, "invalid_request", 900144, text, req))
        if not auth.client_id:
            return self._ms_error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
                req,
            )
        app = self._ms_app(tenant_id, auth.client_id)
        if app is None:
            return self._ms_unknown_app(auth.client_id, tenant, req)
        return grants[grant_type](req, app, auth)

    def _ms_app(self, tenant_id: str, client_id: str) -> _MicrosoftApp | None:
        with self._lock:
            return self._ms_apps.get((tenant_id.lower(), client_id))

    def _ms_unknown_app(self, client_id: str, tenant: str, req: _Request) -> _Reply:
        return self._ms_error(
            400,
            "invalid_client",
            700016,
            f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. "
            "This can happen if the application has not been installed by the administrator of the "
            "tenant or consented to by any user in the tenant. You may have sent your authentication "
            "request to the wrong tenant.",
            req,
        )

    def _ms_authenticate(
        self, req: _Request, app: _MicrosoftApp, auth: _ClientAuth, *, public: bool
    ) -> _Reply | None:
        """None when the client proved itself (secret or certificate assertion), or may go without
        (a public client on a delegated grant); otherwise Entra's refusal."""
        assertion = req.form.get("client_assertion")
        if assertion:
            if req.form.get("client_assertion_type") != ASSERTION_TYPE or auth.client_secret:
                return self._ms_error(
                    400, "invalid_request", 900144, "Unsupported or mixed client authentication.", req
                )
            if is_federated_assertion(assertion, app.client_id):
                return self._ms_federated(req, app, assertion)
            try:
                verify_client_assertion(
                    assertion,
                    client_id=app.client_id,
                    token_url=f"{self.base_url}{req.path}",
                    certificates=app.certificates,
                    seen=self._seen_assertions,
                )
            except AssertionRefused as refused:
                _log.debug("refused client %s: assertion (AADSTS%s)", app.client_id, refused.code)
                return self._ms_error(401, "invalid_client", refused.code, refused.text, req)
            return None
        if auth.client_secret:
            if app.client_secret is None or not _same_secret(auth.client_secret, app.client_secret):
                _log.debug("refused client %s in tenant %s: wrong secret", app.client_id, app.tenant_id)
                return self._ms_invalid_secret(app.client_id, req)
            if app.secret_expires_at is not None and time.time() >= app.secret_expires_at:
                return self._ms_error(
                    401,
                    "invalid_client",
                    7000222,
                    f"The provided client secret keys for app '{app.client_id}' are expired. "
                    "Visit the Azure portal to create new keys for your app.",
                    req,
                )
            return None
        if public and app.public_client:
            return None
        return self._ms_error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            req,
        )

    def _ms_federated(self, req: _Request, app: _MicrosoftApp, assertion: str) -> _Reply | None:
        try:
            verify_federated_assertion(assertion, app.federated, self._issuer_tls)
        except AssertionRefused as refused:
            _log.debug("refused client %s: federated assertion (AADSTS%s)", app.client_id, refused.code)
            return self._ms_error(400, "invalid_client", refused.code, refused.text, req)
        return None

    def _ms_client_credentials(self, req: _Request, app: _MicrosoftApp, auth: _ClientAuth) -> _Reply:
        scope = (req.form.get("scope") or "").strip()
        if not scope:
            return self._ms_error(
                400,
                "invalid_request",
                90014,
                "The required field 'scope' is missing from the credential.",
                req,
            )
        if len(scope.split()) != 1 or not scope.endswith("/.default"):
            return self._ms_error(
                400,
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid. "
                f"The scope {scope} is not valid. "
                "The client credentials flow requires a single scope ending in /.default.",
                req,
            )
        refusal = self._ms_authenticate(req, app, auth, public=False)
        if refusal is not None:
            return refusal
        now, expires_at, lifetime = self._expiry()
        issuer = self._ms_issuer(app.tenant_id)
        audience, roles = app.audience, app.roles
        if scope.lower().startswith(GRAPH_RESOURCE):
            audience, roles = GRAPH_RESOURCE, app.graph_roles
        claims = {
            "aud": audience,
            "iss": issuer,
            "iat": int(now),
            "nbf": int(now),
            "exp": _numeric_date(expires_at),
            "aio": secrets.token_urlsafe(24),
            "app_displayname": f"sandbox app {app.client_id}",
            "appid": app.client_id,
            "appidacr": "2" if req.form.get("client_assertion") else "1",
            "idp": issuer,
            "idtyp": "app",
            "oid": app.object_id,
            "roles": list(roles),
            "sub": app.object_id,
            "tid": app.tenant_id,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }
        token = jwt.encode(
            claims, self._signing_key, algorithm="RS256", headers={"kid": self._key_id, "x5t": self._key_id}
        )
        self._record(
            token,
            _Issued(
                provider="microsoft",
                client_id=app.client_id,
                subject=None,
                scope=scope,
                issued_at=now,
                expires_at=expires_at,
                audience=audience,
                roles=roles,
                object_id=app.object_id,
                tenant_id=app.tenant_id,
            ),
        )
        return self._ms_token_reply(req, {"access_token": token}, lifetime)

    def _ms_token_reply(self, req: _Request, body: dict[str, Any], lifetime: float) -> _Reply:
        headers = (
            {"client-request-id": req.headers["client-request-id"]}
            if req.headers.get("client-request-id")
            else {}
        )
        return _Reply(
            200,
            {
                "token_type": "Bearer",
                "expires_in": _number(lifetime),
                "ext_expires_in": _number(lifetime),
                **body,
            },
            headers=headers,
        )

    # Microsoft delegated: refresh tokens that rotate, device code and authorisation code with PKCE

    def _ms_refresh(self, req: _Request, app: _MicrosoftApp, auth: _ClientAuth) -> _Reply:
        refusal = self._ms_authenticate(req, app, auth, public=True)
        if refusal is not None:
            return refusal
        refresh_token = req.form.get("refresh_token") or ""
        digest = _digest(refresh_token)
        with self._lock:
            grant = self._ms_refresh_grants.pop(digest, None)
            reused = grant is None and digest in self._ms_redeemed
            expired = grant is None and digest in self._ms_expired
            if grant is not None:
                self._ms_redeemed.add(digest)
            if reused:
                self.refresh_token_reuse += 1
        if grant is None or grant.client_id != app.client_id:
            if reused:
                text = (
                    "The provided refresh token was already redeemed. (Only the sandbox refuses a "
                    "redeemed refresh token, so that a lost rotation shows.)"
                )
                return self._ms_error(400, "invalid_grant", 70000, text, req)
            if expired:
                text = (
                    "The refresh token has expired due to inactivity. The token was issued on "
                    f"{dt.date.today().isoformat()} and was inactive for 90.00:00:00."
                )
                return self._ms_error(400, "invalid_grant", 700082, text, req)
            return self._ms_error(
                400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.", req
            )
        scope = self._ms_delegated_scope(req.form.get("scope") or "", grant.scope)
        if scope is None:
            with self._lock:  # a refused request redeems nothing
                self._ms_refresh_grants[digest] = grant
                self._ms_redeemed.discard(digest)
            return self._ms_error(
                400,
                "invalid_scope",
                65001,
                f"The user or administrator has not consented to use the application with ID "
                f"'{app.client_id}' for the requested scope.",
                req,
            )
        return self._ms_delegated_tokens(req, app, grant.user, scope, grant.scope)

    @staticmethod
    def _ms_delegated_scope(requested: str, granted: str) -> str | None:
        """The resource scopes of ``requested`` if the user granted all of them (OIDC scopes aside)."""
        wanted = [s for s in requested.split() if s not in _OIDC_SCOPES]
        have = set(granted.split())
        if not wanted:
            wanted = [s for s in granted.split() if s not in _OIDC_SCOPES]
        if not set(wanted) <= have:
            return None
        return " ".join(wanted)

    def _ms_delegated_tokens(
        self, req: _Request, app: _MicrosoftApp, user: str, scope: str, granted: str
    ) -> _Reply:
        now, expires_at, lifetime = self._expiry()
        audience = _audience_of(scope)
        claims = {
            "aud": audience,
            "iss": self._ms_issuer(app.tenant_id),
            "iat": int(now),
            "nbf": int(now),
            "exp": _numeric_date(expires_at),
            "appid": app.client_id,
            "idtyp": "user",
            "scp": " ".join(s.rsplit("/", 1)[-1] for s in scope.split()),
            "upn": user,
            "unique_name": user,
            "sub": _b64(hashlib.sha256(f"{app.client_id}:{user}".encode()).digest()[:24]),
            "tid": app.tenant_id,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }
        token = jwt.encode(
            claims, self._signing_key, algorithm="RS256", headers={"kid": self._key_id, "x5t": self._key_id}
        )
        with self._lock:
            refresh_token = self._new_ms_refresh_token(app, user, granted)
        self._record(
            token,
            _Issued(
                provider="microsoft_delegated",
                client_id=app.client_id,
                subject=user,
                scope=scope,
                issued_at=now,
                expires_at=expires_at,
                audience=audience,
                tenant_id=app.tenant_id,
            ),
        )
        return self._ms_token_reply(
            req, {"scope": scope, "access_token": token, "refresh_token": refresh_token}, lifetime
        )

    def _new_ms_refresh_token(self, app: _MicrosoftApp, user: str, scope: str) -> str:
        token = "1.AQ" + secrets.token_urlsafe(120)
        self._ms_refresh_grants[_digest(token)] = _MsRefreshGrant(app.tenant_id, app.client_id, user, scope)
        return token

    def _ms_device_code_request(self, req: _Request, tenant: str) -> _Reply:
        tenant_id = self._ms_tenant(tenant)
        if tenant_id is None:
            return self._ms_unknown_tenant(tenant, req)
        client_id = req.form.get("client_id") or ""
        app = self._ms_app(tenant_id, client_id)
        if app is None:
            return self._ms_unknown_app(client_id, tenant, req)
        scope = " ".join((req.form.get("scope") or "").split())
        device_code = "DAQAB" + secrets.token_urlsafe(48)
        user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        with self._lock:
            self._ms_device_codes[_digest(device_code)] = _DeviceCode(
                app.tenant_id, app.client_id, scope, user_code, time.time() + _DEVICE_CODE_LIFETIME
            )
        verification_uri = f"{self.base_url}/devicelogin"
        return _Reply(
            200,
            {
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": verification_uri,
                "expires_in": int(_DEVICE_CODE_LIFETIME),
                "interval": 1,
                "message": f"To sign in, use a web browser to open the page {verification_uri} and enter "
                f"the code {user_code} to authenticate.",
            },
        )

    def _ms_device_code_grant(self, req: _Request, app: _MicrosoftApp, auth: _ClientAuth) -> _Reply:
        refusal = self._ms_authenticate(req, app, auth, public=True)
        if refusal is not None:
            return refusal
        digest = _digest(req.form.get("device_code") or "")
        with self._lock:
            pending = self._ms_device_codes.get(digest)
            if pending is not None and pending.client_id == app.client_id:
                pending.polls += 1
        if pending is None or pending.client_id != app.client_id or time.time() >= pending.expires_at:
            return self._ms_error(400, "expired_token", 70020, "The provided device code has expired.", req)
        if self.deny_consent:
            return self._ms_error(
                400, "authorization_declined", 70019, "The end user denied the authorization request.", req
            )
        if pending.polls < 2:  # the user has not finished signing in on the first poll
            return self._ms_error(
                400,
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                req,
            )
        with self._lock:
            self._ms_device_codes.pop(digest, None)
        return self._ms_consented_tokens(req, app, pending.scope, self.consent_user)

    def _ms_consented_tokens(self, req: _Request, app: _MicrosoftApp, scope: str, user: str) -> _Reply:
        granted = " ".join(s for s in scope.split() if s not in {"openid", "profile"})
        resource = self._ms_delegated_scope(scope, granted) or ""
        if "offline_access" not in scope.split() or not resource:
            return self._ms_error(
                400, "invalid_scope", 70011, "The sandbox needs a resource scope and offline_access.", req
            )
        _log.debug("user consented to Microsoft client %s", app.client_id)
        return self._ms_delegated_tokens(req, app, user, resource, granted)

    def _ms_authorize(self, req: _Request, tenant: str) -> _Reply:
        """The sign-in and consent page, answered at once for ``login_hint`` or ``consent_user``."""
        q = req.query
        tenant_id = self._ms_tenant(tenant)
        app = self._ms_app(tenant_id, q.get("client_id", "")) if tenant_id else None
        if app is None:
            return self._ms_error(400, "unauthorized_client", 700016, "Application not found.", None)
        redirect_uri = q.get("redirect_uri", "")
        parts = urlsplit(redirect_uri)
        if not (parts.scheme == "http" and is_loopback_host(parts.hostname or "")) or parts.fragment:
            return self._ms_error(
                400,
                "invalid_request",
                50011,
                "The redirect URI does not match the redirect URIs configured.",
                None,
            )
        state = q.get("state")

        form_post = q.get("response_mode") == "form_post"

        def back(**params: str) -> _Reply:
            if state is not None:
                params["state"] = state
            if form_post:  # the page the browser submits to the redirect URI (OIDC form_post)
                fields = "".join(
                    f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                    for k, v in params.items()
                )
                page = (
                    f'<html><body onload="document.forms[0].submit()"><form method="post" '
                    f'action="{html.escape(redirect_uri)}">{fields}</form></body></html>'
                )
                return _Reply(200, None, html=page)
            query = "&".join(p for p in (parts.query, urlencode(params)) if p)
            return _Reply(302, None, headers={"Location": urlunsplit(parts._replace(query=query))})

        challenge = q.get("code_challenge") or ""
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256" or not challenge:
            return back(error="invalid_request", error_description="AADSTS9002325: PKCE (S256) is required.")
        if self.deny_consent:
            return back(error="access_denied", error_description="AADSTS65004: User declined to consent.")
        code = "0.AQ" + secrets.token_urlsafe(48)
        with self._lock:
            self._ms_auth_codes[_digest(code)] = _AuthCode(
                client_id=app.client_id,
                redirect_uri=redirect_uri,
                scope=" ".join(q.get("scope", "").split()),
                user=q.get("login_hint") or self.consent_user,
                offline=True,
                challenge=challenge,
                challenge_method="S256",
                expires_at=time.time() + _AUTH_CODE_LIFETIME,
            )
        return back(code=code, session_state=str(uuid.uuid4()))

    def _ms_code_exchange(self, req: _Request, app: _MicrosoftApp, auth: _ClientAuth) -> _Reply:
        refusal = self._ms_authenticate(req, app, auth, public=True)
        if refusal is not None:
            return refusal
        with self._lock:
            grant = self._ms_auth_codes.pop(_digest(req.form.get("code") or ""), None)
        if grant is None or grant.client_id != app.client_id or time.time() >= grant.expires_at:
            return self._ms_error(
                400, "invalid_grant", 70008, "The provided authorization code has expired.", req
            )
        if req.form.get("redirect_uri") != grant.redirect_uri:
            return self._ms_error(400, "invalid_grant", 50148, "The redirect_uri does not match.", req)
        verifier = req.form.get("code_verifier") or ""
        if not _PKCE_VERIFIER.fullmatch(verifier) or not hmac.compare_digest(
            _pkce_challenge(verifier, "S256"), grant.challenge or ""
        ):
            return self._ms_error(
                400, "invalid_grant", 501481, "The Code_Verifier does not match the code_challenge.", req
            )
        return self._ms_consented_tokens(req, app, grant.scope, grant.user)

    # Google

    def _google_token(self, req: _Request) -> _Reply:
        grant_type = req.form.get("grant_type")
        if not grant_type:
            return _google_error(400, "invalid_request", "Missing required parameter: grant_type")
        if grant_type == "refresh_token":
            return self._google_refresh(req)
        if grant_type == "authorization_code":
            return self._google_code_exchange(req)
        if grant_type == JWT_BEARER_GRANT:
            return self._google_jwt_bearer(req)
        return _google_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")

    def _google_client(self, req: _Request) -> _GoogleClient:
        auth = self._client_auth(req, lambda text: _google_error(400, "invalid_request", text))
        if not auth.client_id:
            raise _Refusal(
                _google_error(400, "invalid_request", "Could not determine client ID from request.")
            )
        with self._lock:
            client = self._google_clients.get(auth.client_id)
        if client is None:
            raise _Refusal(_google_error(401, "invalid_client", "The OAuth client was not found."))
        if not _same_secret(auth.client_secret, client.client_secret):
            _log.debug("refused Google client %s: wrong or missing secret", client.client_id)
            raise _Refusal(_google_error(401, "invalid_client", "Unauthorized"))
        return client

    def _issue_google(
        self, client_id: str, user: str, scope: str, *, grant_id: str | None
    ) -> tuple[str, float]:
        now, expires_at, lifetime = self._expiry()
        token = "ya29.a0" + secrets.token_urlsafe(96)
        self._record(
            token,
            _Issued(
                provider="google",
                client_id=client_id,
                subject=user,
                scope=scope,
                issued_at=now,
                expires_at=expires_at,
                audience=client_id,
                grant_id=grant_id,
            ),
        )
        return token, lifetime

    def _google_refresh(self, req: _Request) -> _Reply:
        client = self._google_client(req)
        refresh_token = req.form.get("refresh_token")
        if not refresh_token:
            return _google_error(400, "invalid_request", "Missing required parameter: refresh_token")
        with self._lock:
            grant = self._refresh_grants.get(_digest(refresh_token))
        if grant is None or (grant.expires_at is not None and grant.expires_at <= time.time()):
            _log.debug("refused refresh for Google client %s: unknown or revoked grant", client.client_id)
            return _google_error(400, "invalid_grant", "Token has been expired or revoked.")
        if grant.client_id != client.client_id:
            return _google_error(401, "unauthorized_client", "Unauthorized")
        scope = grant.scope
        if req.form.get("scope"):
            requested = req.form["scope"].split()
            if not set(requested) <= set(grant.scope.split()):
                return _google_error(
                    400, "invalid_scope", "Some requested scopes were not granted by the user."
                )
            scope = " ".join(requested)
        token, lifetime = self._issue_google(client.client_id, grant.user, scope, grant_id=grant.grant_id)
        body: dict[str, Any] = {
            "access_token": token,
            "expires_in": _number(lifetime),
            "scope": scope,
            "token_type": "Bearer",
        }
        if grant.expires_at is not None:
            body["refresh_token_expires_in"] = max(int(grant.expires_at - time.time()), 0)
        return _Reply(200, body)

    def _google_code_exchange(self, req: _Request) -> _Reply:
        client = self._google_client(req)
        code = req.form.get("code")
        if not code:
            return _google_error(400, "invalid_request", "Missing required parameter: code")
        with self._lock:
            grant = self._auth_codes.pop(_digest(code), None)
        if grant is None or grant.client_id != client.client_id or time.time() >= grant.expires_at:
            return _google_error(400, "invalid_grant", "Malformed auth code.")
        if req.form.get("redirect_uri") != grant.redirect_uri:
            return _google_error(400, "redirect_uri_mismatch", "Bad Request")
        if grant.challenge is not None:
            verifier = req.form.get("code_verifier")
            if not verifier:
                return _google_error(400, "invalid_grant", "Missing code verifier.")
            if not _PKCE_VERIFIER.fullmatch(verifier) or not hmac.compare_digest(
                _pkce_challenge(verifier, grant.challenge_method), grant.challenge
            ):
                return _google_error(400, "invalid_grant", "Invalid code verifier.")
        body: dict[str, Any] = {"token_type": "Bearer", "scope": grant.scope}
        grant_id = None
        if grant.offline:
            with self._lock:
                refresh_token = self._new_refresh_token(client.client_id, grant.user, grant.scope)
            body["refresh_token"] = refresh_token
            grant_id = _digest(refresh_token)
        token, lifetime = self._issue_google(client.client_id, grant.user, grant.scope, grant_id=grant_id)
        body.update({"access_token": token, "expires_in": _number(lifetime)})
        return _Reply(200, body)

    # Google's refusals of a JWT bearer assertion in the order it checks them, one return each.
    def _google_jwt_bearer(self, req: _Request) -> _Reply:  # noqa: C901
        assertion = req.form.get("assertion")
        if not assertion:
            return _google_error(400, "invalid_request", "Missing required parameter: assertion")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return _google_error(400, "invalid_grant", "Invalid JWT: the assertion could not be parsed.")
        issuer = str(unverified.get("iss") or "")
        with self._lock:
            account = self._service_accounts.get(issuer.lower())
        if account is None:
            return _google_error(400, "invalid_grant", "Invalid grant: account not found")
        if header.get("kid") not in (None, account.key_id):
            return _google_error(400, "invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=[self.google_token_uri, DEFAULT_GOOGLE_TOKEN_URI],
                issuer=issuer,
                leeway=_CLOCK_SKEW,
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.InvalidSignatureError:
            _log.debug("refused assertion of %s: bad signature", account.client_email)
            return _google_error(400, "invalid_grant", "Invalid JWT Signature.")
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
            return _google_error(400, "invalid_grant", _SHORT_LIVED)
        except jwt.InvalidAudienceError:
            return _google_error(
                400,
                "invalid_grant",
                f"Invalid JWT: Failed audience check. The expected value was {self.google_token_uri}",
            )
        except jwt.InvalidTokenError as exc:
            return _google_error(400, "invalid_grant", f"Invalid JWT: {type(exc).__name__}")
        if float(claims["exp"]) - float(claims["iat"]) > _ASSERTION_MAX_LIFETIME:
            return _google_error(400, "invalid_grant", _SHORT_LIVED)
        scope = str(claims.get("scope") or "").strip()
        if not scope:
            return _google_error(400, "invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        subject = claims.get("sub")
        if (
            subject
            and account.allowed_subjects is not None
            and str(subject).lower() not in account.allowed_subjects
        ):
            _log.debug("refused assertion of %s: subject not delegated", account.client_email)
            return _google_error(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client not "
                "authorized for any of the scopes requested.",
            )
        now, expires_at, lifetime = self._expiry()
        token = "ya29.c.b0" + secrets.token_urlsafe(96)
        self._record(
            token,
            _Issued(
                provider="google_service_account",
                client_id=account.client_id,
                subject=str(subject or account.client_email),
                scope=scope,
                issued_at=now,
                expires_at=expires_at,
                audience=account.client_id,
            ),
        )
        return _Reply(200, {"access_token": token, "expires_in": _number(lifetime), "token_type": "Bearer"})

    def _google_authorize(self, req: _Request) -> _Reply:
        """The consent screen, answered at once for ``login_hint`` or ``consent_user``."""
        q = req.query
        with self._lock:
            client = self._google_clients.get(q.get("client_id", ""))
        if client is None:
            return _google_error(401, "invalid_client", "The OAuth client was not found.")
        redirect_uri = q.get("redirect_uri", "")
        if not _redirect_allowed(redirect_uri, client):
            return _google_error(
                400, "redirect_uri_mismatch", "The redirect URI is not registered for this client."
            )
        if req.repeated:
            return _google_error(
                400, "invalid_request", f"Parameter {sorted(req.repeated)[0]!r} was repeated."
            )
        state = q.get("state")

        def back(**params: str) -> _Reply:
            if state is not None:
                params["state"] = state
            parts = urlsplit(redirect_uri)
            query = "&".join(p for p in (parts.query, urlencode(params)) if p)
            return _Reply(302, None, headers={"Location": urlunsplit(parts._replace(query=query))})

        if q.get("response_type") != "code":
            return back(error="unsupported_response_type")
        scope = " ".join(q.get("scope", "").split())
        if not scope:
            return back(error="invalid_request", error_description="Missing required parameter: scope")
        challenge = q.get("code_challenge") or None
        method = q.get("code_challenge_method") or "plain"
        if challenge is not None and (
            method not in {"S256", "plain"} or not _PKCE_VERIFIER.fullmatch(challenge)
        ):
            return back(
                error="invalid_request", error_description="Invalid code_challenge or code_challenge_method."
            )
        if self.deny_consent:
            return back(error="access_denied")
        code = "4/0A" + secrets.token_urlsafe(48)
        with self._lock:
            self._auth_codes[_digest(code)] = _AuthCode(
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                scope=scope,
                user=q.get("login_hint") or self.consent_user,
                offline=q.get("access_type") == "offline",
                challenge=challenge,
                challenge_method=method,
                expires_at=time.time() + _AUTH_CODE_LIFETIME,
            )
        _log.debug("consent granted to Google client %s", client.client_id)
        return back(code=code, scope=scope, authuser="0", prompt="consent")

    def _revoke_request(self, req: _Request) -> _Reply:
        """Google's revocation endpoint: a refresh token takes its access tokens with it, and an
        access token takes the refresh token it came from."""
        token = req.form.get("token") or req.query.get("token")
        if not token:
            return _google_error(400, "invalid_request", "Missing required parameter: token")
        digest = _digest(token)
        with self._lock:
            if digest in self._refresh_grants:
                self._revoke_grant(digest)
                return _Reply(200, {})
            record = self._tokens.get(digest)
            if record is not None and record.provider == "google" and digest not in self._revoked_tokens:
                self._revoked_tokens.add(digest)
                if record.grant_id is not None:
                    self._revoke_grant(record.grant_id)
                return _Reply(200, {})
        return _google_error(400, "invalid_token", "Token expired or revoked")

    # generic RFC 6749 client credentials

    def _oauth2_token(self, req: _Request) -> _Reply:
        grant_type = req.form.get("grant_type")
        if not grant_type:
            return _Reply(
                400, {"error": "invalid_request", "error_description": "Missing grant_type parameter."}
            )
        if grant_type != "client_credentials":
            return _Reply(
                400,
                {
                    "error": "unsupported_grant_type",
                    "error_description": f"Grant type {grant_type!r} is not supported.",
                },
            )
        auth = self._client_auth(
            req, lambda text: _Reply(400, {"error": "invalid_request", "error_description": text})
        )
        with self._lock:
            client = self._oauth2_clients.get(auth.client_id or "")
        if client is None or not _same_secret(auth.client_secret, client.client_secret):
            _log.debug("refused OAuth2 client %s", auth.client_id)
            return _Reply(
                401,
                {"error": "invalid_client", "error_description": "Client authentication failed."},
                headers={"WWW-Authenticate": 'Basic realm="sandbox"'},
            )
        scope = client.scope
        if req.form.get("scope"):
            requested = req.form["scope"].split()
            if not set(requested) <= set(client.scope.split()):
                return _Reply(
                    400,
                    {
                        "error": "invalid_scope",
                        "error_description": "The requested scope exceeds the scope granted to the client.",
                    },
                )
            scope = " ".join(requested)
        now, expires_at, lifetime = self._expiry()
        token = secrets.token_urlsafe(32)
        self._record(
            token,
            _Issued(
                provider="oauth2",
                client_id=client.client_id,
                subject=None,
                scope=scope,
                issued_at=now,
                expires_at=expires_at,
            ),
        )
        return _Reply(
            200,
            {"access_token": token, "token_type": "Bearer", "expires_in": _number(lifetime), "scope": scope},
        )

    # RFC 7662

    def _google_tokeninfo(self, req: _Request) -> _Reply:
        """Google's ``tokeninfo``: what a Google access token is for (its scope, client, user)."""
        view = self.introspect(req.form.get("access_token") or req.query.get("access_token") or "")
        if view is None or not view["active"] or not str(view["provider"]).startswith("google"):
            return _Reply(400, {"error": "invalid_token", "error_description": "Invalid Value"})
        return _Reply(
            200,
            {
                "azp": view["client_id"],
                "aud": view["aud"],
                "scope": view["scope"],
                "exp": str(int(view["exp"])),
                "expires_in": str(max(int(view["exp"] - time.time()), 0)),
                "email": view["sub"],
                "email_verified": "true",
            },
        )

    def _introspect_request(self, req: _Request) -> _Reply:
        token = req.form.get("token")
        if not req.is_form or not token:
            return _Reply(400, {"error": "invalid_request", "error_description": "Missing token parameter."})
        view = self.introspect(token)
        if view is None or not view["active"]:
            return _Reply(200, {"active": False})
        return _Reply(200, view)


_SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)


def _audience_of(scope: str) -> str:
    """The resource a delegated scope names (``https://outlook.office.com/SMTP.Send``)."""
    first = next((s for s in scope.split() if "/" in s), "https://graph.microsoft.com/")
    return first.rsplit("/", 1)[0]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _google_error(status: int, error: str, description: str) -> _Reply:
    return _Reply(status, {"error": error, "error_description": description})


def _pkce_challenge(verifier: str, method: str) -> str:
    if method == "plain":
        return verifier
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _redirect_allowed(redirect_uri: str, client: _GoogleClient) -> bool:
    if redirect_uri in client.redirect_uris:
        return True
    parts = urlsplit(redirect_uri)
    return parts.scheme == "http" and is_loopback_host(parts.hostname or "") and not parts.fragment
