"""Integrations: one sending identity each, stored as one Secrets Manager secret.

The secret's JSON (docs/design.md, "Integrations") is validated into a typed model per provider.
Validation errors name the bad field and never echo a value: pydantic's messages are rebuilt
from locations and types only.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from mailbroker.callers import entry_problem
from mailbroker.errors import InvalidIntegration, UnknownIntegration, remember_secret

DEFAULT_MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
# Delegated (a user's consent): SMTP, and Graph's sendMail once a message leaves through Graph.
DEFAULT_DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send offline_access"
DEFAULT_GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
# Keyless: the audience Entra expects in a federated identity credential's token, and Google's
# Security Token Service and IAM Credentials API.
ENTRA_TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"  # noqa: S105 (an audience)
DEFAULT_GOOGLE_STS_ENDPOINT = "https://sts.googleapis.com/v1/token"
DEFAULT_IAMCREDENTIALS_ENDPOINT = "https://iamcredentials.googleapis.com"

DEFAULT_GRAPH_ENDPOINT = "https://graph.microsoft.com"
DEFAULT_GMAIL_ENDPOINT = "https://gmail.googleapis.com"
GRAPH_APP_SCOPE = "https://graph.microsoft.com/.default"
GRAPH_DELEGATED_SCOPE = "https://graph.microsoft.com/Mail.Send offline_access"
GMAIL_SEND_SCOPE = "https://www.googleapis.com/auth/gmail.send"

# Per-provider default sending limits (Microsoft 365: 30 messages a minute, 3 connections a mailbox).
PROVIDER_LIMITS: dict[str, dict[str, int]] = {
    "microsoft": {"messages_per_minute": 30, "max_connections": 3},
    "microsoft_delegated": {"messages_per_minute": 30, "max_connections": 3},
    "google": {"messages_per_minute": 60, "max_connections": 3},
    "google_service_account": {"messages_per_minute": 60, "max_connections": 3},
}
# Per-transport defaults, over the provider's: Exchange Online allows 4 concurrent Graph requests
# per mailbox, 30 messages a minute and 10,000 recipients a day; Google Workspace 10,000
# recipients a day per user.
TRANSPORT_LIMITS: dict[str, dict[str, int]] = {
    "graph": {"messages_per_minute": 30, "max_connections": 4, "recipients_per_day": 10_000},
    "gmail_api": {"messages_per_minute": 60, "max_connections": 3, "recipients_per_day": 10_000},
}

# Which providers each transport can send for, and what a transport asks of the token's scope.
TRANSPORT_PROVIDERS: dict[str, frozenset[str]] = {
    "graph": frozenset({"microsoft", "microsoft_delegated"}),
    "gmail_api": frozenset({"google", "google_service_account"}),
}
_TRANSPORT_SCOPES: dict[str, dict[str, str]] = {
    "graph": {"microsoft": GRAPH_APP_SCOPE, "microsoft_delegated": GRAPH_DELEGATED_SCOPE},
}
_GMAIL_SEND_SCOPES = frozenset(
    {
        GMAIL_SEND_SCOPE,
        GOOGLE_MAIL_SCOPE,
        "https://www.googleapis.com/auth/gmail.compose",
        "https://www.googleapis.com/auth/gmail.modify",
    }
)
# The SMTP endpoint an integration on an HTTP transport keeps (for a later switch back to smtp).
_PROVIDER_SMTP_HOSTS = {
    "microsoft": "smtp.office365.com",
    "microsoft_delegated": "smtp.office365.com",
    "google": "smtp.gmail.com",
    "google_service_account": "smtp.gmail.com",
}


def is_loopback_host(host: str) -> bool:
    if host.lower() in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# AWS's Nitro services over IPv6: instance metadata fd00:ec2::254, and fd00:ec2::23 and the rest
# of the range, which no credential has a reason to reach.
_AWS_NITRO_V6 = ipaddress.ip_network("fd00:ec2::/32")
# IPv6 prefixes whose last 32 bits are an IPv4 address some network path delivers to: NAT64
# (RFC 6052 well-known and RFC 8215 local-use) and the deprecated IPv4-compatible form (::a.b.c.d).
_EMBEDDED_V4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def is_forbidden_address(host: str) -> bool:
    """Link-local and instance-metadata addresses never receive a credential, in any of the IPv6
    forms that reach an IPv4 address (mapped, compatible, NAT64, 6to4)."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr in _AWS_NITRO_V6:
            return True
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            return embedded.is_link_local
    return addr.is_link_local


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:  # ::ffff:169.254.169.254
        return addr.ipv4_mapped
    if addr.sixtofour is not None:  # 2002:a9fe:a9fe::
        return addr.sixtofour
    low = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if int(addr) >> 32 == 0 and int(low) > 1:  # ::169.254.169.254 (not :: or ::1)
        return low
    if any(addr in network for network in _EMBEDDED_V4):
        return low
    return None


def url_problem(value: str) -> str | None:
    """Why ``value`` cannot be a token URL, or None. Two URL parsers must read the same scheme, host
    and port: ``urlsplit`` (which the checks here use) and urllib3's ``parse_url`` (which requests
    connects with). They disagree on backslashes (``http://169.254.169.254\\@localhost/``: urlsplit
    sees localhost, urllib3 connects to 169.254.169.254), so a backslash, user information,
    whitespace or a control character is refused outright, and any remaining difference too."""
    from urllib3.util import parse_url
    from urllib3.util.url import LocationParseError

    if "\\" in value:
        return "must not contain a backslash"
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        return "must not contain spaces or control characters"
    try:
        ours, theirs = urlsplit(value), parse_url(value)
        our_port, their_port = ours.port, theirs.port
    except (ValueError, LocationParseError):
        return "is not a valid URL"
    if "@" in ours.netloc or theirs.auth:
        return "must not contain user information (user@host)"
    their_host = (theirs.host or "").strip("[]").lower()
    our_host = ours.hostname or ""
    if not our_host.isascii():  # urllib3 puts a non-ASCII name in its IDNA form
        try:
            our_host = our_host.encode("idna").decode("ascii")
        except UnicodeError:
            return "has a host name that is not a valid internationalised name"
    if (ours.scheme, our_host, our_port) != ((theirs.scheme or "").lower(), their_host, their_port):
        return "is read differently by different URL parsers"
    return None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class SmtpEndpoint(_Model):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)

    @model_validator(mode="after")
    def _safe_transport(self) -> SmtpEndpoint:
        if is_forbidden_address(self.host):
            raise ValueError("smtp.host is a link-local or instance-metadata address")
        if self.security == "none" and not is_loopback_host(self.host):
            raise ValueError(
                "security 'none' is only allowed to a loopback host: credentials never travel in clear"
            )
        return self


class Sender(_Model):
    email: str = Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
    name: str | None = Field(default=None, max_length=200)


class Limits(_Model):
    messages_per_minute: int | None = Field(default=None, ge=1, le=100_000)
    max_connections: int | None = Field(default=None, ge=1, le=100)
    recipients_per_day: int | None = Field(default=None, ge=1)


class Tracking(_Model):
    """Open and click tracking of a message's HTML part: off unless asked for."""

    opens: bool = False
    clicks: bool = False


def _https_url(value: str, field_name: str) -> str:
    problem = url_problem(value)
    if problem:
        raise ValueError(f"{field_name} {problem}")
    parts = urlsplit(value)
    if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback_host(parts.hostname or "")):
        raise ValueError(f"{field_name} must be an https URL")
    if not parts.hostname:
        raise ValueError(f"{field_name} has no host")
    if is_forbidden_address(parts.hostname):
        raise ValueError(f"{field_name} points at a link-local or instance-metadata address")
    return value.rstrip("/") if field_name == "authority" else value


class _IntegrationBase(_Model):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    transport: Literal["smtp", "graph", "gmail_api"] = "smtp"
    smtp: SmtpEndpoint
    graph_endpoint: str | None = None
    gmail_endpoint: str | None = None
    username: str = Field(min_length=1, max_length=254)
    senders: list[Sender] = Field(default_factory=list)
    usage: list[str] = Field(default_factory=lambda: ["transactional"])
    limits: Limits = Field(default_factory=Limits)
    smtp_check: bool = False  # the keeper runs the live SMTP check for this integration
    # The default of its messages' ``tracking``.
    tracking: Tracking = Field(default_factory=Tracking)
    # IAM principals that may send through, or take tokens of, this integration (callers.py);
    # empty: any principal the queue's and the API's IAM let in may send, and tokens only go to
    # the stack's TokenApiPrincipals.
    allowed_callers: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, entries: list[str]) -> list[str]:
        for index, entry in enumerate(entries):
            problem = entry_problem(entry)
            if problem:
                raise ValueError(f"allowed_callers[{index}] {problem}")
        return entries

    # Vetted like the token URLs; a field validator so a problem names the field.
    _v_graph_endpoint = field_validator("graph_endpoint")(
        lambda v: v if v is None else _https_url(v, "graph_endpoint")
    )
    _v_gmail_endpoint = field_validator("gmail_endpoint")(
        lambda v: v if v is None else _https_url(v, "gmail_endpoint")
    )

    @model_validator(mode="before")
    @classmethod
    def _transport_defaults(cls, data: Any) -> Any:
        """An HTTP transport brings its own defaults: the scope its API needs and, since no SMTP
        server is used, the provider's well-known SMTP endpoint."""
        if not isinstance(data, dict) or data.get("transport") not in TRANSPORT_PROVIDERS:
            return data
        provider = data.get("provider")
        filled = dict(data)
        scope = _TRANSPORT_SCOPES.get(data["transport"], {}).get(str(provider))
        if scope is not None and "scope" not in filled:
            filled["scope"] = scope
        if "smtp" not in filled and provider in _PROVIDER_SMTP_HOSTS:
            filled["smtp"] = {"host": _PROVIDER_SMTP_HOSTS[str(provider)]}
        return filled

    @model_validator(mode="after")
    def _transport_fits(self) -> _IntegrationBase:
        provider = self.provider  # type: ignore[attr-defined]
        allowed = TRANSPORT_PROVIDERS.get(self.transport)
        if allowed is not None and provider not in allowed:
            raise ValueError(
                f"transport '{self.transport}' is for providers {', '.join(sorted(allowed))}, not {provider}"
            )
        scopes = set(str(getattr(self, "scope", "")).split())
        if self.transport == "graph" and not any(s.startswith(DEFAULT_GRAPH_ENDPOINT + "/") for s in scopes):
            raise ValueError(
                "transport 'graph' needs a Microsoft Graph scope (https://graph.microsoft.com/.default "
                "for app-only access); leave 'scope' out to get it"
            )
        if self.transport == "gmail_api" and not scopes & _GMAIL_SEND_SCOPES:
            raise ValueError(
                "transport 'gmail_api' needs the scope https://www.googleapis.com/auth/gmail.send "
                "or https://mail.google.com/"
            )
        return self

    @property
    def api_endpoint(self) -> str:
        """The base URL of the HTTP transport's API (Graph or Gmail)."""
        if self.transport == "graph":
            return (self.graph_endpoint or DEFAULT_GRAPH_ENDPOINT).rstrip("/")
        return (self.gmail_endpoint or DEFAULT_GMAIL_ENDPOINT).rstrip("/")

    @property
    def uses_refresh_token(self) -> bool:
        return False

    def default_sender(self) -> Sender:
        """Who a message without ``from`` is sent as: the first of ``senders``, else ``username``."""
        return self.senders[0] if self.senders else Sender(email=self.username)

    def effective_limits(self) -> Limits:
        defaults = {
            **PROVIDER_LIMITS.get(self.provider, {}),  # type: ignore[attr-defined]
            **TRANSPORT_LIMITS.get(self.transport, {}),
        }
        merged = {**defaults, **{k: v for k, v in self.limits.model_dump().items() if v is not None}}
        return Limits(**merged)

    def redacted(self) -> dict[str, Any]:
        """The integration as JSON with every secret field replaced by '********'."""
        redacted: dict[str, Any] = json.loads(self.model_dump_json())
        return redacted


class ClientCertificate(_Model):
    """A certificate credential for an Entra app registration: the private key (PEM) and its X.509
    certificate (PEM), whose public part is uploaded to the app registration. ``send_x5c`` also
    sends the certificate in the assertion (x5c), for subject-name/issuer authentication."""

    private_key: SecretStr
    certificate: str = Field(min_length=1, max_length=20_000)
    send_x5c: bool = False

    @field_validator("certificate")
    @classmethod
    def _pem_certificate(cls, value: str) -> str:
        from cryptography import x509

        try:
            x509.load_pem_x509_certificate(value.encode())
        except ValueError:
            raise ValueError("certificate is not a PEM X.509 certificate") from None
        return value

    @field_validator("private_key")
    @classmethod
    def _pem_key(cls, value: SecretStr) -> SecretStr:
        if "PRIVATE KEY-----" not in value.get_secret_value():
            raise ValueError("private_key is not a PEM private key")
        return value


class Federated(_Model):
    """Keyless Microsoft: the client assertion is a JWT from AWS STS ``GetWebIdentityToken`` for
    the function's own role, which the app registration trusts through a federated identity
    credential (issuer = the account's issuer URL, subject = the role ARN, this audience)."""

    audience: str = Field(default=ENTRA_TOKEN_EXCHANGE_AUDIENCE, min_length=1, max_length=1000)


class WorkloadIdentity(_Model):
    """Keyless Google: the function's AWS web identity token is exchanged at Google's STS through a
    workload identity pool provider (``audience``: its full resource name), then the service
    account is impersonated and signs the domain-wide delegation assertion through IAM
    Credentials ``signJwt``. The endpoints are overridable for the sandbox, like ``token_uri``."""

    audience: str = Field(
        min_length=1,
        max_length=1000,
        pattern=r"^//iam\.googleapis\.com/projects/[^/]+/locations/global/workloadIdentityPools/[^/]+/providers/[^/]+$",
    )
    service_account: str = Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
    sts_endpoint: str = DEFAULT_GOOGLE_STS_ENDPOINT
    iamcredentials_endpoint: str = DEFAULT_IAMCREDENTIALS_ENDPOINT

    _v_sts = field_validator("sts_endpoint")(lambda v: _https_url(v, "sts_endpoint"))
    _v_iam = field_validator("iamcredentials_endpoint")(
        lambda v: _https_url(v, "iamcredentials_endpoint").rstrip("/")
    )

    @property
    def token_audience(self) -> str:
        """The ``aud`` of the AWS token: a provider's default allowed audience is its resource
        name as an https URL."""
        return "https:" + self.audience


def _one_client_credential(model: Any, *, required: bool) -> None:
    given = [
        name
        for name in ("client_secret", "client_certificate", "federated")
        if getattr(model, name, None) is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give one client credential, not {' and '.join(given)}")
    if required and not given:
        raise ValueError("client_secret, client_certificate or federated is required")


def _credential_missing(data: Any, handler: Any) -> Any:
    """Validate, and name a missing client credential as ``client_secret`` even when other fields
    fail too (a model validator alone would only run once every field is valid)."""
    missing = isinstance(data, dict) and not any(
        data.get(name) or (name == "federated" and data.get(name) is not None)
        for name in ("client_secret", "client_certificate", "federated")
    )
    details: list[Any] = []
    title = "integration"
    try:
        model = handler(data)
    except ValidationError as exc:
        if not missing:
            raise
        title = exc.title
        details = [
            {"type": e["type"], "loc": e["loc"], "input": e.get("input"), "ctx": e.get("ctx", {})}
            for e in exc.errors()
        ]
    if not missing:
        return model
    details.append({"type": "missing", "loc": ("client_secret",), "input": data})
    raise ValidationError.from_exception_data(title, details)


class MicrosoftIntegration(_IntegrationBase):
    provider: Literal["microsoft"]
    tenant_id: str = Field(min_length=1, max_length=128)
    client_id: str = Field(min_length=1, max_length=128)
    client_secret: SecretStr | None = None
    client_certificate: ClientCertificate | None = None
    federated: Federated | None = None
    authority: str = DEFAULT_MICROSOFT_AUTHORITY
    scope: str = DEFAULT_MICROSOFT_SCOPE
    client_secret_expires_at: str | None = None

    _v_authority = field_validator("authority")(lambda v: _https_url(v, "authority"))

    @model_validator(mode="wrap")
    @classmethod
    def _named_credential(cls, data: Any, handler: Any) -> Any:
        return _credential_missing(data, handler)

    @model_validator(mode="after")
    def _credential(self) -> MicrosoftIntegration:
        _one_client_credential(self, required=True)
        return self


class MicrosoftDelegatedIntegration(_IntegrationBase):
    """A user's delegated consent (a mailbox an admin will not grant app-only access to, or a
    personal Outlook.com account). Microsoft rotates ``refresh_token`` on use; the newest one lives
    sealed in the token table and is written back here (see docs/decisions.md)."""

    provider: Literal["microsoft_delegated"]
    tenant_id: str = Field(min_length=1, max_length=128)
    client_id: str = Field(min_length=1, max_length=128)
    refresh_token: SecretStr
    client_secret: SecretStr | None = None
    client_certificate: ClientCertificate | None = None
    authority: str = DEFAULT_MICROSOFT_AUTHORITY
    scope: str = DEFAULT_DELEGATED_SCOPE
    client_secret_expires_at: str | None = None

    _v_authority = field_validator("authority")(lambda v: _https_url(v, "authority"))

    @model_validator(mode="after")
    def _credential(self) -> MicrosoftDelegatedIntegration:
        _one_client_credential(self, required=False)
        return self

    @property
    def uses_refresh_token(self) -> bool:
        return True

    @property
    def is_public_client(self) -> bool:
        return self.client_secret is None and self.client_certificate is None


class GoogleIntegration(_IntegrationBase):
    provider: Literal["google"]
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    refresh_token: SecretStr
    token_uri: str = DEFAULT_GOOGLE_TOKEN_URI
    scope: str = GOOGLE_MAIL_SCOPE

    _v_token_uri = field_validator("token_uri")(lambda v: _https_url(v, "token_uri"))

    @property
    def uses_refresh_token(self) -> bool:
        return True


class ServiceAccountKey(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["service_account"] = "service_account"
    client_email: str = Field(min_length=3)
    private_key: SecretStr
    private_key_id: str | None = None
    token_uri: str = DEFAULT_GOOGLE_TOKEN_URI

    def as_info(self) -> dict[str, Any]:
        info = self.model_dump()
        info["private_key"] = self.private_key.get_secret_value()
        return info


class GoogleServiceAccountIntegration(_IntegrationBase):
    provider: Literal["google_service_account"]
    service_account_info: ServiceAccountKey | None = None
    workload_identity: WorkloadIdentity | None = None
    subject: str = Field(min_length=3, pattern=r"^[^@\s]+@[^@\s]+$")
    scope: str = GOOGLE_MAIL_SCOPE
    token_uri: str | None = None

    @model_validator(mode="after")
    def _check_token_uri(self) -> GoogleServiceAccountIntegration:
        if (self.service_account_info is None) == (self.workload_identity is None):
            raise ValueError("give service_account_info or workload_identity (exactly one)")
        _https_url(self.effective_token_uri, "token_uri")
        return self

    @property
    def effective_token_uri(self) -> str:
        if self.token_uri:
            return self.token_uri
        return self.service_account_info.token_uri if self.service_account_info else DEFAULT_GOOGLE_TOKEN_URI

    @property
    def service_account_email(self) -> str:
        if self.workload_identity is not None:
            return self.workload_identity.service_account
        assert self.service_account_info is not None
        return self.service_account_info.client_email


class OAuth2Integration(_IntegrationBase):
    provider: Literal["oauth2"]
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    scope: str = Field(min_length=1)

    _v_token_url = field_validator("token_url")(lambda v: _https_url(v, "token_url"))


class BasicIntegration(_IntegrationBase):
    provider: Literal["basic"]
    password: SecretStr


Integration = Annotated[
    MicrosoftIntegration
    | MicrosoftDelegatedIntegration
    | GoogleIntegration
    | GoogleServiceAccountIntegration
    | OAuth2Integration
    | BasicIntegration,
    Field(discriminator="provider"),
]
OAuthIntegration = (
    MicrosoftIntegration
    | MicrosoftDelegatedIntegration
    | GoogleIntegration
    | GoogleServiceAccountIntegration
    | OAuth2Integration
)

_ADAPTER: TypeAdapter[Integration] = TypeAdapter(Integration)
SECRET_FIELDS = ("client_secret", "refresh_token", "password", "private_key")


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic errors as ``{"field", "problem"}`` pairs that never include the input value."""
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).endswith("Integration"))
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":
            msg = (
                "provider must be one of microsoft, microsoft_delegated, google, "
                "google_service_account, oauth2, basic"
            )
        problems.append({"field": loc or "(root)", "problem": msg})
    return problems


def parse_integration(data: object, *, expected_id: str | None = None) -> Integration:
    """Validate a secret's JSON into its provider's model, or raise InvalidIntegration."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError:
            raise InvalidIntegration(
                "integration secret is not valid JSON",
                details=[{"field": "(root)", "problem": "not valid JSON"}],
            ) from None
    try:
        integration = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = field_errors(exc)
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
        raise InvalidIntegration(f"integration is invalid: {summary}", details=problems) from None
    _remember_secrets(integration)
    if expected_id is not None and integration.id != expected_id:
        raise InvalidIntegration(
            f"secret for {expected_id!r} holds id {integration.id!r}",
            details=[{"field": "id", "problem": "does not match the secret name"}],
        )
    return integration


def context_of(integration: Any) -> dict[str, str]:
    """What a hint may name about an integration: never a secret."""
    context = {
        "integration": str(getattr(integration, "id", "") or ""),
        "mailbox": str(getattr(integration, "username", "") or ""),
        "tenant": str(getattr(integration, "tenant_id", "") or ""),
        "authority": str(getattr(integration, "authority", "") or ""),
        "client_id": str(getattr(integration, "client_id", "") or ""),
    }
    if isinstance(integration, GoogleServiceAccountIntegration):
        info = integration.service_account_info
        context["client_id"] = (
            str(getattr(info, "client_id", "") or info.client_email)
            if info is not None
            else integration.service_account_email
        )
        context["mailbox"] = integration.subject
    return context


def _remember_secrets(value: Any) -> None:
    """Every secret field of the integration is redacted from any error text from now on."""
    if isinstance(value, SecretStr):
        remember_secret(value.get_secret_value())
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _remember_secrets(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            _remember_secrets(item)


class IntegrationStore:
    """Reads integrations from Secrets Manager through Powertools' SecretsProvider, which caches
    each secret in memory for ``max_age`` seconds."""

    def __init__(self, secrets_client: Any, prefix: str, *, max_age: int = 60) -> None:
        from aws_lambda_powertools.utilities.parameters import SecretsProvider

        self._client = secrets_client
        self._provider = SecretsProvider(boto3_client=secrets_client)
        self.prefix = prefix
        self.max_age = max_age

    def secret_name(self, integration_id: str) -> str:
        return f"{self.prefix}{integration_id}"

    def get(self, integration_id: str, *, force_fetch: bool = False) -> Integration:
        from aws_lambda_powertools.utilities.parameters.exceptions import GetParameterError

        try:
            raw = self._provider.get(
                self.secret_name(integration_id), max_age=self.max_age, force_fetch=force_fetch
            )
        except GetParameterError as exc:
            if _is_not_found(exc):
                raise UnknownIntegration(f"no integration {integration_id!r}") from None
            from mailbroker.errors import AwsUnavailable

            raise AwsUnavailable(f"Secrets Manager unavailable reading {integration_id!r}") from exc
        if isinstance(raw, bytes):
            raw = raw.decode()
        return parse_integration(raw, expected_id=integration_id)

    def list_ids(self) -> list[str]:
        """Every integration id under the prefix (paginated)."""
        ids: list[str] = []
        paginator = self._client.get_paginator("list_secrets")
        for page in paginator.paginate(Filters=[{"Key": "name", "Values": [self.prefix]}]):
            for secret in page.get("SecretList", []):
                name = secret["Name"]
                if name.startswith(self.prefix):
                    ids.append(name[len(self.prefix) :])
        return sorted(ids)

    def put(self, integration: Integration) -> None:
        """Create or replace an integration's secret (validated before it is written)."""
        body = json.dumps(unredacted(integration))
        name = self.secret_name(integration.id)
        try:
            self._client.put_secret_value(SecretId=name, SecretString=body)
        except self._client.exceptions.ResourceNotFoundException:
            self._client.create_secret(Name=name, SecretString=body)
        self._provider.clear_cache()

    def write_refresh_token(self, integration_id: str, refresh_token: str, replaces: set[str]) -> bool:
        """Put a rotated refresh token into the integration's secret, changing nothing else, if the
        secret still holds one whose fingerprint is in ``replaces`` (else an operator has given it a
        new consent meanwhile, and that one stays). Returns whether the secret was written."""
        from botocore.exceptions import BotoCoreError, ClientError

        from mailbroker.errors import aws_failure
        from mailbroker.tokens.model import fingerprint

        name = self.secret_name(integration_id)
        try:
            document = json.loads(self._client.get_secret_value(SecretId=name)["SecretString"])
            current = document.get("refresh_token") if isinstance(document, dict) else None
            if not isinstance(current, str) or fingerprint(current) not in replaces:
                return False
            document["refresh_token"] = refresh_token
            self._client.put_secret_value(SecretId=name, SecretString=json.dumps(document))
        except (KeyError, ValueError):
            return False
        except (ClientError, BotoCoreError) as exc:
            raise aws_failure(exc, "Secrets Manager write-back") from None
        self._provider.clear_cache()
        return True

    def delete(self, integration_id: str) -> None:
        self._client.delete_secret(SecretId=self.secret_name(integration_id), ForceDeleteWithoutRecovery=True)
        self._provider.clear_cache()


def unredacted(integration: Integration) -> dict[str, Any]:
    """The integration as the JSON stored in its secret, secrets included. Only for writing it."""
    revealed: dict[str, Any] = _reveal(integration.model_dump(mode="python", exclude_none=True))
    return revealed


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reveal(v) for v in value]
    return value


def _is_not_found(exc: Exception) -> bool:
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code", "") if cause else ""
    return code == "ResourceNotFoundException" or "ResourceNotFoundException" in str(exc)
