"""Keyless credentials: the function's own AWS identity, as a JWT from STS ``GetWebIdentityToken``.

AWS outbound identity federation gives an IAM role a signed JWT (issuer: the account's issuer URL;
``sub``: the role ARN; ``aud``: what was asked for). Entra accepts it as the client assertion of an
app with a matching federated identity credential; Google's STS accepts it as the subject token of
a workload identity pool provider. Nothing is stored: every token request mints a fresh JWT.

The STS client is always regional (``GetWebIdentityToken`` does not exist on the global endpoint;
see :func:`mailbroker.runtime.sts_client`). STS's answers are classified here; the JWT itself is
never logged or put into an error.
"""

from __future__ import annotations

from typing import Any

from mailbroker.errors import TokenError, TokenUnavailable

# What the token is asked for: short-lived, RS256 (Entra and Google both verify RS256).
WEB_IDENTITY_LIFETIME = 300
SIGNING_ALGORITHM = "RS256"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 (a type name)

_TRANSIENT = {
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
}


class WebIdentityTokens:
    """Mints web identity tokens for the calling role through a regional STS client, built on
    first use (``sts``: the client, or a function that builds it)."""

    def __init__(self, sts: Any, *, lifetime: int = WEB_IDENTITY_LIFETIME) -> None:
        self._sts_given = sts
        self._client: Any = None
        self._lifetime = lifetime

    @property
    def _sts(self) -> Any:
        if self._client is None:
            self._client = self._sts_given() if callable(self._sts_given) else self._sts_given
        return self._client

    def token(self, audience: str) -> str:
        """A new JWT whose ``aud`` is ``audience``, or a classified TokenError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._sts.get_web_identity_token(
                Audience=[audience], SigningAlgorithm=SIGNING_ALGORITHM, DurationSeconds=self._lifetime
            )
        except ClientError as exc:
            raise classify_sts_error(exc, audience) from None
        except BotoCoreError as exc:
            raise TokenUnavailable(
                f"AWS STS could not be reached for a web identity token: {type(exc).__name__}"
            ) from None
        return str(answer["WebIdentityToken"])

    def assertion(self, audience: str) -> FederatedAssertion:
        return FederatedAssertion(self, audience)

    def __repr__(self) -> str:
        return f"WebIdentityTokens(lifetime={self._lifetime})"


class FederatedAssertion:
    """MSAL's ``client_assertion`` callable: a fresh web identity token each time MSAL asks."""

    def __init__(self, tokens: WebIdentityTokens, audience: str) -> None:
        self._tokens = tokens
        self.audience = audience

    def __call__(self) -> str:
        return self._tokens.token(self.audience)

    def __repr__(self) -> str:
        return f"FederatedAssertion(audience={self.audience!r})"


def subject_token_supplier(tokens: WebIdentityTokens, audience: str) -> Any:
    """A google-auth ``SubjectTokenSupplier`` that hands Google's STS a web identity token."""
    from google.auth.identity_pool import SubjectTokenSupplier

    class _AwsWebIdentity(SubjectTokenSupplier):
        def get_subject_token(self, context: Any, request: Any) -> str:
            return tokens.token(audience)

        def __repr__(self) -> str:
            return f"AwsWebIdentity(audience={audience!r})"

    return _AwsWebIdentity()


def classify_sts_error(exc: Any, audience: str) -> TokenError:
    error = exc.response.get("Error", {}) if isinstance(getattr(exc, "response", None), dict) else {}
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "")
    if code == "OutboundWebIdentityFederationDisabledException":
        return TokenError(
            f"AWS STS refused a web identity token: outbound identity federation is not enabled in "
            f"this account ({code})",
            code="federation_disabled",
        )
    if code in {"AccessDenied", "AccessDeniedException", "SessionDurationEscalationException"}:
        return TokenError(
            f"AWS STS refused a web identity token for audience {audience!r} ({code}): {message}".rstrip(
                ": "
            ),
            code="federation_not_permitted",
        )
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _TRANSIENT or status >= 500:
        return TokenUnavailable(f"AWS STS failed to issue a web identity token ({code or status})")
    return TokenError(
        f"AWS STS refused a web identity token ({code}): {message}".rstrip(": "),
        code="federation_not_permitted",
    )
