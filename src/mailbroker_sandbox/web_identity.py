"""AWS outbound identity federation, stood in on loopback (moto has no ``GetWebIdentityToken``).

One HTTPS server is both the account's issuer and the regional STS endpoint:

- ``GET /.well-known/openid-configuration`` and ``GET /.well-known/jwks.json``: the OIDC discovery
  document and the RS256 verification key, as at the account's issuer URL;
- ``POST /`` with ``Action=GetWebIdentityToken``: STS's query API. The caller's role is found from
  the access key id in the SigV4 ``Authorization`` header (``roles``, else ``default_role``); the
  answer is a JWT with ``iss`` = this issuer, ``sub`` = the role ARN, ``aud`` = the audience asked
  for, and the ``https://sts.amazonaws.com/`` claims, in STS's XML.

``enabled = False`` answers ``OutboundWebIdentityFederationDisabledException`` as STS does before
``aws iam enable-outbound-web-identity-federation``; ``allowed_audiences`` stands in for the IAM
condition ``sts:IdentityTokenAudience`` (``AccessDenied`` otherwise). Boto3 reaches it through its
standard ``AWS_ENDPOINT_URL_STS`` (``environment()``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from mailbroker_sandbox.ca import SandboxCA
from mailbroker_sandbox.https import LoopbackHTTPSServer, SandboxRequestHandler

_log = logging.getLogger(__name__)

SANDBOX_ACCOUNT = "123456789012"
SANDBOX_ROLE = f"arn:aws:iam::{SANDBOX_ACCOUNT}:role/mailbroker-sandbox-TokenBrokerRole"
_STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
_CREDENTIAL = re.compile(
    r"Credential=(?P<key>[^/,\s]+)/\d{8}/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request"
)
_MAX_BODY = 64 * 1024
_SOCKET_TIMEOUT = 10.0


# --- a loopback HTTPS server with one routing function ---------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: Message
    body: bytes

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body or b"{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def bearer(self) -> str:
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"

    @classmethod
    def of_json(cls, status: int, value: Any) -> Reply:
        return cls(status, json.dumps(value).encode())


class _Handler(SandboxRequestHandler):
    server: LoopbackHTTPS
    server_version = "mailbroker-sandbox/1"
    timeout = _SOCKET_TIMEOUT

    def _serve(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self._write(Reply.of_json(400, {"error": "invalid_request"}))
            return
        body = self.rfile.read(length) if method == "POST" else b""
        try:
            reply = self.server.route(Request(method, urlsplit(self.path).path, self.headers, body))
        except Exception:
            _log.exception("sandbox federation server failed on %s %s", method, self.path)
            reply = Reply.of_json(500, {"error": "server_error"})
        self._write(reply)

    def _write(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(reply.body)


class LoopbackHTTPS(LoopbackHTTPSServer):
    """The sandbox's HTTPS server on 127.0.0.1 handing every request to ``route``. ``start()``
    serves it on a daemon thread; ``stop()`` closes it."""

    def __init__(self, ca: SandboxCA, route: Callable[[Request], Reply], name: str) -> None:
        self.route = route
        self._name = name
        super().__init__(None, ca.server_context(), _Handler, socket_timeout=_SOCKET_TIMEOUT)
        self.base_url = f"https://127.0.0.1:{self.server_port}"

    def start(self) -> None:
        self.serve_in_background(self._name)

    def stop(self) -> None:
        self.close()
        self.server_close()


# --- the issuer and STS -----------------------------------------------------------------------------


@dataclass
class _Minted:
    audience: str
    subject: str
    token: str = field(repr=False)  # kept so tests can prove it never reaches a log or a table


@dataclass
class WebIdentityIssuer:
    """The account's outbound identity federation issuer and its regional STS endpoint."""

    ca: SandboxCA
    default_role: str = SANDBOX_ROLE
    roles: dict[str, str] = field(default_factory=dict)  # access key id -> role ARN
    enabled: bool = True
    allowed_audiences: set[str] | None = None  # None: any (no IAM condition)
    minted: list[_Minted] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._kid = hashlib.sha256(der).hexdigest()[:32]
        self._lock = threading.Lock()
        self._server = LoopbackHTTPS(self.ca, self._route, "sandbox-web-identity")

    @property
    def issuer(self) -> str:
        return self._server.base_url

    @property
    def sts_endpoint(self) -> str:
        return self._server.base_url

    def environment(self) -> dict[str, str]:
        """What points boto3's STS client here (and only STS), trusting the sandbox CA the way
        botocore reads one (``AWS_CA_BUNDLE``)."""
        return {"AWS_ENDPOINT_URL_STS": self.sts_endpoint, "AWS_CA_BUNDLE": str(self.ca.ca_cert)}

    def start(self) -> WebIdentityIssuer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> WebIdentityIssuer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.minted.clear()
        self.enabled = True
        self.allowed_audiences = None

    def count(self, audience: str | None = None) -> int:
        with self._lock:
            return sum(1 for m in self.minted if audience is None or m.audience == audience)

    def mint(self, audience: str, subject: str, *, lifetime: int = 300) -> str:
        """A token as STS would sign it (also what tests use to forge near-misses)."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": str(uuid.uuid4()),
            "https://sts.amazonaws.com/": {
                "aws_account": SANDBOX_ACCOUNT,
                "principal_id": subject,
                "source_region": "eu-west-1",
            },
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self._kid, "typ": "JWT"})

    def jwk(self) -> dict[str, Any]:
        key = dict(RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True))
        key.update({"kid": self._kid, "use": "sig", "alg": "RS256"})
        return key

    # routing

    def _route(self, req: Request) -> Reply:
        if req.method == "GET" and req.path == "/.well-known/openid-configuration":
            return Reply.of_json(
                200,
                {
                    "issuer": self.issuer,
                    "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256", "ES384"],
                },
            )
        if req.method == "GET" and req.path == "/.well-known/jwks.json":
            return Reply.of_json(200, {"keys": [self.jwk()]})
        if req.method == "POST" and req.path == "/":
            return self._sts(req)
        return Reply.of_json(404, {"error": "not_found"})

    def _sts(self, req: Request) -> Reply:
        form = req.form()
        if form.get("Action") != "GetWebIdentityToken":
            return _sts_error(400, "InvalidAction", f"Could not find operation {form.get('Action')!r}.")
        signed = _CREDENTIAL.search(req.headers.get("Authorization") or "")
        if signed is None or signed["service"] != "sts":
            return _sts_error(403, "MissingAuthenticationToken", "Request is missing Authentication Token")
        if not self.enabled:
            return _sts_error(
                403,
                "OutboundWebIdentityFederationDisabledException",
                "Outbound web identity federation is disabled for this account.",
            )
        audiences = [v for k, v in sorted(form.items()) if k.startswith("Audience.member.")]
        if not audiences or form.get("SigningAlgorithm") not in {"RS256", "ES384"}:
            return _sts_error(400, "ValidationError", "Audience and SigningAlgorithm are required.")
        role = self.roles.get(signed["key"], self.default_role)
        allowed = self.allowed_audiences
        if allowed is not None and not set(audiences) <= allowed:
            return _sts_error(
                403,
                "AccessDenied",
                f"User: {role} is not authorized to perform: sts:GetWebIdentityToken",
            )
        lifetime = int(form.get("DurationSeconds") or 300)
        token = self.mint(audiences[0] if len(audiences) == 1 else audiences, role, lifetime=lifetime)  # type: ignore[arg-type]
        with self._lock:
            self.minted.append(_Minted(",".join(audiences), role, token))
        expiration = dt.datetime.fromtimestamp(time.time() + lifetime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = (
            f'<GetWebIdentityTokenResponse xmlns="{_STS_NS}"><GetWebIdentityTokenResult>'
            f"<WebIdentityToken>{escape(token)}</WebIdentityToken><Expiration>{expiration}</Expiration>"
            f"</GetWebIdentityTokenResult><ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId>"
            "</ResponseMetadata></GetWebIdentityTokenResponse>"
        )
        return Reply(200, body.encode(), "text/xml")


def _sts_error(status: int, code: str, message: str) -> Reply:
    body = (
        f'<ErrorResponse xmlns="{_STS_NS}"><Error><Type>Sender</Type><Code>{escape(code)}</Code>'
        f"<Message>{escape(message)}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    )
    return Reply(status, body.encode(), "text/xml")
