"""The sandbox Microsoft endpoint's check of a client assertion (RFC 7523, Entra's certificate
credential): the certificate it names must be registered for the app and unexpired, the signature
must verify against that certificate, ``aud`` must be this token endpoint, ``iss`` and ``sub`` the
client id, the assertion unexpired and short-lived, and its ``jti`` never seen before.

Each refusal is Entra's error for it (AADSTS700027 for the certificate, 700024 for the time range,
700021 for iss/sub, 50027 otherwise), so the client classifies what it would see in production.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_MAX_LIFETIME = 3600
_SKEW = 30


@dataclass(frozen=True)
class RegisteredCertificate:
    """A certificate uploaded to an app registration (Certificates & secrets > Certificates)."""

    sha256: bytes
    sha1: bytes
    public_key: Any = field(repr=False)
    not_after: float

    @classmethod
    def from_pem(cls, pem: str) -> RegisteredCertificate:
        cert = x509.load_pem_x509_certificate(pem.encode())
        return cls(
            sha256=cert.fingerprint(hashes.SHA256()),
            sha1=cert.fingerprint(hashes.SHA1()),  # noqa: S303 (a name, not a signature)
            public_key=cert.public_key(),
            not_after=cert.not_valid_after_utc.timestamp(),
        )


class AssertionRefused(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class SeenAssertions:
    """jti values already accepted, remembered until their assertion would have expired anyway."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def first_use(self, jti: str, expires_at: float) -> bool:
        now = time.time()
        with self._lock:
            for old in [k for k, exp in self._seen.items() if exp + _SKEW < now]:
                del self._seen[old]
            if jti in self._seen:
                return False
            self._seen[jti] = expires_at
            return True


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def verify_client_assertion(
    assertion: str,
    *,
    client_id: str,
    token_url: str,
    certificates: tuple[RegisteredCertificate, ...],
    seen: SeenAssertions,
) -> None:
    """Raise AssertionRefused unless ``assertion`` authenticates ``client_id`` at ``token_url``."""
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.InvalidTokenError:
        raise AssertionRefused(50027, "JWT token is invalid or malformed.") from None
    certificate = _named_certificate(header, certificates)
    if time.time() >= certificate.not_after:
        raise AssertionRefused(
            700027,
            "Client assertion failed signature validation. [Reason - The key used is expired., "
            f"Thumbprint of key used by client: '{_thumbprint_text(header)}']",
        )
    claims = _verified_claims(assertion, header, certificate, token_url)
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise AssertionRefused(
            700021, "Client assertion application identifier doesn't match 'client_id' parameter."
        )
    if float(claims["exp"]) - float(claims.get("nbf") or claims.get("iat") or time.time()) > _MAX_LIFETIME:
        raise AssertionRefused(700024, "Client assertion is not within its valid time range.")
    if not seen.first_use(str(claims["jti"]), float(claims["exp"])):
        raise AssertionRefused(50027, "The client assertion was already used (jti replayed).")


def _named_certificate(
    header: dict[str, Any], certificates: tuple[RegisteredCertificate, ...]
) -> RegisteredCertificate:
    # base64url, with or without padding (MSAL pads)
    s256, s1 = (str(header.get(name) or "").rstrip("=") for name in ("x5t#S256", "x5t"))
    for certificate in certificates:
        if s256 and s256 == _b64url(certificate.sha256):
            return certificate
        if s1 and s1 == _b64url(certificate.sha1):
            return certificate
    raise AssertionRefused(
        700027,
        "Client assertion failed signature validation. [Reason - The key was not found., "
        f"Thumbprint of key used by client: '{_thumbprint_text(header)}', Please visit the Azure Portal, "
        "Graph Explorer or directly use MS Graph to see configured keys for app.]",
    )


def _verified_claims(
    assertion: str, header: dict[str, Any], certificate: RegisteredCertificate, token_url: str
) -> dict[str, Any]:
    if header.get("alg") not in {"RS256", "PS256", "ES256"}:
        raise AssertionRefused(50027, f"JWT token uses an unsupported algorithm {header.get('alg')!r}.")
    try:
        return dict(
            jwt.decode(
                assertion,
                certificate.public_key,
                algorithms=[header["alg"]],
                audience=token_url,
                leeway=_SKEW,
                options={"require": ["aud", "iss", "sub", "exp", "jti"]},
            )
        )
    except jwt.InvalidSignatureError:
        raise AssertionRefused(
            700027,
            "Client assertion failed signature validation. [Reason - The provided signature value did "
            "not match the expected signature value.]",
        ) from None
    except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
        raise AssertionRefused(700024, "Client assertion is not within its valid time range.") from None
    except jwt.InvalidAudienceError:
        raise AssertionRefused(
            50027, f"Invalid JWT token: the audience must be the token endpoint {token_url}."
        ) from None
    except jwt.InvalidTokenError as exc:
        raise AssertionRefused(50027, f"JWT token is invalid or malformed: {type(exc).__name__}.") from None


def _thumbprint_text(header: dict[str, Any]) -> str:
    value = header.get("x5t#S256") or header.get("x5t") or ""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex().upper()
    except ValueError:
        return hashlib.sha256(str(value).encode()).hexdigest()[:16]
