"""What an Entra app presents to prove it is itself: a client secret, or a client assertion.

A client assertion (RFC 7523, Entra's "certificate credential") is a short JWT signed with the
app's private key, naming the certificate by its SHA-256 thumbprint (``x5t#S256``) and, for
subject-name/issuer authentication, carrying the certificate itself (``x5c``). MSAL signs it with
its own ``JwtAssertionCreator`` and takes it through its documented callable ``client_assertion``:
the assertion source is a plain callable, so a source that is not a stored key (a federated
identity token) plugs in the same way. See docs/decisions.md, "Client assertions".

Nothing here logs or returns a key; errors name the field, never its value.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailbroker.errors import TokenError

# An assertion lives ten minutes, as MSAL's own do.
ASSERTION_LIFETIME = 600
# The keeper and doctor warn this long before a certificate's notAfter.
CERTIFICATE_WARNING_DAYS = 30

AssertionSource = Callable[[], str]


@dataclass(frozen=True)
class CertificateFacts:
    """What an operator needs to know about a certificate, read from the certificate itself."""

    thumbprint_sha256: str  # hex
    thumbprint_sha1: str  # hex, as the Azure portal shows it
    subject: str
    not_before: float
    not_after: float

    def days_left(self, now: float) -> float:
        return (self.not_after - now) / 86400.0

    @property
    def not_after_iso(self) -> str:
        return dt.datetime.fromtimestamp(self.not_after, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_facts(certificate_pem: str) -> CertificateFacts:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    return CertificateFacts(
        thumbprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        thumbprint_sha1=cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 (a name, not a signature)
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def load_certificate_pair(private_key_pem: str, certificate_pem: str) -> tuple[Any, Any]:
    """The private key and certificate, checked to belong together; a mismatch is classified."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise TokenError(
            "client_certificate.private_key is not an unencrypted PEM private key",
            code="token_certificate_mismatch",
        ) from None
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise TokenError(
            "client_certificate.private_key does not belong to client_certificate.certificate",
            code="token_certificate_mismatch",
        )
    return key, cert


def check_certificate_dates(facts: CertificateFacts, now: float) -> None:
    if now >= facts.not_after:
        raise TokenError(
            f"the client certificate (thumbprint {facts.thumbprint_sha1}) expired on {facts.not_after_iso}",
            code="token_certificate_expired",
        )


class CertificateAssertion:
    """A fresh signed client assertion on every call (MSAL calls it once per token request).

    ``issuer`` is the client id (the assertion's ``iss`` and ``sub``); ``audience`` is the token
    endpoint, set once MSAL has discovered it."""

    def __init__(
        self,
        private_key_pem: str,
        certificate_pem: str,
        *,
        issuer: str,
        send_x5c: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key, _ = load_certificate_pair(private_key_pem, certificate_pem)
        self._key = key
        self._algorithm = "PS256" if _is_rsa(key) else "ES256"
        self.facts = certificate_facts(certificate_pem)
        self._x5c = [_base64_der(certificate_pem)] if send_x5c else None
        self.issuer = issuer
        self.audience = ""
        self._clock = clock

    def __call__(self) -> str:
        from msal.oauth2cli.assertion import JwtAssertionCreator

        now = self._clock()
        check_certificate_dates(self.facts, now)
        headers: dict[str, Any] = {"x5c": self._x5c} if self._x5c else {}
        creator = JwtAssertionCreator(
            self._key, self._algorithm, headers=headers, sha256_thumbprint=self.facts.thumbprint_sha256
        )
        assertion = creator.create_normal_assertion(
            audience=self.audience, issuer=self.issuer, expires_in=ASSERTION_LIFETIME, not_before=int(now)
        )
        return assertion.decode() if isinstance(assertion, bytes) else str(assertion)

    def __repr__(self) -> str:
        return f"CertificateAssertion(thumbprint={self.facts.thumbprint_sha1}, issuer={self.issuer!r})"


def _is_rsa(key: Any) -> bool:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return isinstance(key, rsa.RSAPrivateKey)


def _base64_der(certificate_pem: str) -> str:
    lines = [line.strip() for line in certificate_pem.strip().splitlines()]
    return "".join(line for line in lines if line and not line.startswith("-----"))


def msal_credential(integration: Any) -> tuple[Any, CertificateAssertion | None]:
    """The ``client_credential`` for MSAL's ConfidentialClientApplication (None: a public client),
    and the certificate assertion whose audience must be set once the authority is known."""
    certificate = getattr(integration, "client_certificate", None)
    if certificate is not None:
        assertion = CertificateAssertion(
            certificate.private_key.get_secret_value(),
            certificate.certificate,
            issuer=integration.client_id,
            send_x5c=certificate.send_x5c,
        )
        return {"client_assertion": assertion}, assertion
    secret = getattr(integration, "client_secret", None)
    if secret is not None:
        return secret.get_secret_value(), None
    return None, None


def credential_proof_parts(integration: Any) -> list[str]:
    """The secret material that names this credential (digested into the cache key, never stored)."""
    certificate = getattr(integration, "client_certificate", None)
    if certificate is not None:
        return [certificate.private_key.get_secret_value(), certificate.certificate]
    secret = getattr(integration, "client_secret", None)
    return [secret.get_secret_value()] if secret is not None else []
