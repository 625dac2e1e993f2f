"""The sandbox Entra endpoint's check of a federated client assertion (workload identity federation).

An app registration trusts an external issuer through federated identity credentials: each names an
``issuer``, a ``subject`` and ``audiences``. Entra takes a client assertion that is not signed by
one of the app's certificates (its ``iss`` is not the client id) as an external token, finds the
credential whose issuer, subject and audience match, and verifies the signature against the keys
the issuer publishes (OIDC discovery, then ``jwks_uri``), fetched over verified TLS.

Each refusal is Entra's code for it: AADSTS70021 when the app has no federated credential at all,
700211 (no credential for this issuer), 700212 (none for this audience), 700213 (none for this
subject), 700024 (outside its validity) and 50027 (malformed or badly signed).
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from dataclasses import dataclass
from typing import Any

import jwt

from mailbroker_sandbox.client_assertions import AssertionRefused

_SKEW = 30


@dataclass(frozen=True)
class FederatedCredential:
    """App registrations > Certificates & secrets > Federated credentials (Other issuer)."""

    issuer: str
    subject: str
    audiences: tuple[str, ...] = ("api://AzureADTokenExchange",)
    name: str = "mailbroker"


def is_federated_assertion(assertion: str, client_id: str) -> bool:
    """An assertion whose issuer is not the app itself, and that names no certificate."""
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return False
    if header.get("x5t") or header.get("x5t#S256"):
        return False
    return str(claims.get("iss") or "") != client_id


def verify_federated_assertion(
    assertion: str, credentials: tuple[FederatedCredential, ...], tls: ssl.SSLContext
) -> FederatedCredential:
    """The credential that admits ``assertion``, or AssertionRefused with Entra's code."""
    try:
        unverified = jwt.decode(assertion, options={"verify_signature": False})
        header = jwt.get_unverified_header(assertion)
    except jwt.InvalidTokenError:
        raise AssertionRefused(50027, "JWT token is invalid or malformed.") from None
    credential = _matching(unverified, credentials)
    key = _issuer_key(credential.issuer, str(header.get("kid") or ""), tls)
    try:
        jwt.decode(
            assertion,
            key,
            algorithms=["RS256"],
            audience=list(credential.audiences),
            issuer=credential.issuer,
            leeway=_SKEW,
            options={"require": ["iss", "sub", "aud", "exp"]},
        )
    except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
        raise AssertionRefused(700024, "Client assertion is not within its valid time range.") from None
    except jwt.InvalidTokenError as exc:
        raise AssertionRefused(
            50027, f"Invalid JWT token. The token signature could not be validated ({type(exc).__name__})."
        ) from None
    return credential


def _matching(claims: dict[str, Any], credentials: tuple[FederatedCredential, ...]) -> FederatedCredential:
    issuer, subject = str(claims.get("iss") or ""), str(claims.get("sub") or "")
    audience = claims.get("aud")
    audiences = {audience} if isinstance(audience, str) else set(audience or [])
    named = ",".join(sorted(audiences))
    said = f"Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{named}'."
    if not credentials:
        raise AssertionRefused(
            70021, f"No matching federated identity record found for presented assertion. {said}"
        )
    by_issuer = [c for c in credentials if c.issuer == issuer]
    if not by_issuer:
        raise AssertionRefused(
            700211, f"No matching federated identity record found for presented assertion issuer '{issuer}'."
        )
    by_audience = [c for c in by_issuer if audiences & set(c.audiences)]
    if not by_audience:
        raise AssertionRefused(
            700212,
            f"No matching federated identity record found for presented assertion audience '{named}'.",
        )
    for credential in by_audience:
        if credential.subject == subject:
            return credential
    raise AssertionRefused(
        700213, f"No matching federated identity record found for presented assertion subject '{subject}'."
    )


def _issuer_key(issuer: str, kid: str, tls: ssl.SSLContext) -> Any:
    """The issuer's signing key ``kid``, through its OIDC discovery document (verified TLS)."""
    try:
        discovery = get_json(f"{issuer.rstrip('/')}/.well-known/openid-configuration", tls)
        keys = get_json(str(discovery["jwks_uri"]), tls)
        for jwk in keys.get("keys", []):
            if jwk.get("kid") == kid:
                return jwt.PyJWK(jwk).key
    except (OSError, ValueError, KeyError, jwt.PyJWKError):
        raise AssertionRefused(
            50027, f"Unable to retrieve the signing keys of the issuer '{issuer}'."
        ) from None
    raise AssertionRefused(50027, f"The issuer '{issuer}' publishes no key with kid '{kid}'.")


def get_json(url: str, tls: ssl.SSLContext) -> dict[str, Any]:
    if not url.startswith("https://"):
        raise ValueError("an issuer is only trusted over https")
    with urllib.request.urlopen(url, context=tls, timeout=5) as response:  # noqa: S310 (https only, checked above)
        value = json.loads(response.read())
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
