"""``mailbroker doctor ID``: every step between a stored secret and an accepted SMTP AUTH, each with
✓ or ✗ and a hint — secret, token (with the JWT's claims decoded, not verified), TCP/TLS, EHLO,
AUTH, QUIT; for the graph and gmail_api transports the token's claims or scope and an empty
request the API authorises and refuses. No mail is sent. The token comes fresh from the
provider, bypassing the cache, so a wrong secret shows even while a cached token is still valid."""

from __future__ import annotations

import argparse
import calendar
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mailbroker.diagnosis import ENTRA_ADMIN_CONSENT, microsoft_admin_consent_url
from mailbroker.errors import (
    AwsUnavailable,
    MailbrokerError,
    aws_error_code,
    classify_exception,
    classify_token_error,
    classify_transport_error,
)
from mailbroker.integrations import (
    DEFAULT_MICROSOFT_SCOPE,
    GOOGLE_MAIL_SCOPE,
    BasicIntegration,
    GoogleIntegration,
    GoogleServiceAccountIntegration,
    MicrosoftDelegatedIntegration,
    MicrosoftIntegration,
    context_of,
)

from mailbroker_cli.context import Context
from mailbroker_cli.output import Output

# What Exchange Online's tokens carry as "aud": its resource URIs, or its first-party app id.
EXCHANGE_AUDIENCES = frozenset(
    {
        "https://outlook.office.com",
        "https://outlook.office365.com",
        "00000002-0000-0ff1-ce00-000000000000",
    }
)
SEND_AS_APP = "SMTP.SendAsApp"
MAIL_SEND = "Mail.Send"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
# Google's refresh tokens of a consent screen in Testing last 7 days.
TESTING_REFRESH_LIFETIME = 7 * 86400
# A credential ending within this is flagged (the keeper's warning window).
EXPIRY_WINDOW = 30 * 86400
# Steps that depend on the one before; the token's claim checks do not stop the SMTP steps.
SKIPPABLE = ("secret", "web identity", "token", "connect", "tls", "ehlo", "auth", "quit")


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool | None  # None: skipped after an earlier failure
    detail: str = ""
    code: str | None = None
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.ok is False:
            body.update(code=self.code, hint=self.hint)
        return body


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    doctor = commands.add_parser(
        "doctor",
        parents=[common],
        help="diagnose an integration step by step (no mail is sent)",
        description="Check an integration step by step: secret, token and its claims, TCP/TLS, EHLO, "
        "AUTH, QUIT. No mail is sent. Exit code 0 only when every step passes.",
    )
    doctor.add_argument("id")
    doctor.set_defaults(handler=run_doctor)


def run_doctor(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    steps: list[Step] = []
    if not out.as_json:
        out.line(f"mailbroker doctor {args.id}")
    for step in diagnose(ctx, args.id):
        steps.append(step)
        if not out.as_json:
            print_step(out, step)
    ok = all(step.ok for step in steps)
    if out.as_json:
        out.json({"integration": args.id, "ok": ok, "steps": [s.to_dict() for s in steps]})
    else:
        out.line()
        out.line(
            out.paint("all checks passed", "green")
            if ok
            else out.paint(f"{sum(s.ok is False for s in steps)} check(s) failed", "red")
        )
    return 0 if ok else 1


def print_step(out: Output, step: Step) -> None:
    detail = step.detail if step.ok is not None else out.paint("skipped", "dim")
    out.line(f"  {out.mark(step.ok)} {step.name:<9} {detail}")
    if step.ok is False and step.hint:
        out.line(f"    {'':<9} {out.paint('hint:', 'yellow')} {step.hint}")


def diagnose(ctx: Context, integration_id: str) -> Iterator[Step]:
    """The doctor's steps, each yielded as soon as it is known."""
    try:
        integration = ctx.integrations.get(integration_id)
    except Exception as exc:
        from mailbroker_cli.context import describe_failure

        error = classify_exception(exc)
        code, message, hint = describe_failure(exc) or (error.code, error.message, error.hint)
        yield Step("secret", False, message, code, hint)
        yield from _skipped("secret")
        return
    yield Step(
        "secret",
        True,
        f"{integration.provider} integration for {integration.username} "
        f"(secret {ctx.integrations.secret_name(integration_id)})",
    )
    yield from expiry_steps(integration, time.time())
    if (
        isinstance(integration, MicrosoftIntegration | MicrosoftDelegatedIntegration)
        and integration.client_certificate is not None
    ):
        yield certificate_step(integration.client_certificate)
    token: str | None = None
    keyless = list(keyless_steps(integration))
    yield from keyless
    if keyless and keyless[-1].ok is False:
        yield from _skipped("web identity")
        return
    if isinstance(integration, BasicIntegration):
        yield Step("token", True, "basic authentication (AUTH PLAIN/LOGIN): no token needed")
    else:
        try:
            if isinstance(integration, MicrosoftDelegatedIntegration):
                fresh = fresh_delegated_token(ctx, integration)
            else:
                fresh = fetch_fresh_token(integration, ctx.settings.http_timeout)
        except Exception as exc:
            error = classify_exception(exc)
            yield Step("token", False, error.message, error.code, error.hint)
            yield from _skipped("token")
            return
        token = fresh.token
        yield Step("token", True, f"access token issued by the provider, valid for {int(fresh.lifetime)} s")
        if integration.transport != "smtp":
            yield from api_steps(integration, token, ctx.settings.http_timeout)
            return
        yield from claim_steps(integration, token, fresh.granted)
        yield from consent_screen_steps(integration, fresh)
        if isinstance(integration, MicrosoftIntegration):
            yield from graph_permission_steps(integration, token, ctx.settings.http_timeout)
    smtp = list(smtp_steps(integration, token))
    yield from smtp
    if token is not None and isinstance(integration, MicrosoftIntegration):
        yield from service_principal_steps(integration, token, smtp)


def api_steps(integration: Any, token: str, http_timeout: float) -> Iterator[Step]:
    """An HTTP transport's steps: the token's claims or scope, then an empty request to the API
    that it authorises and refuses (nothing is sent)."""
    from mailbroker.transports.check import api_check

    steps = api_check(integration, token, timeout=http_timeout)
    for step in steps:
        yield Step(step.name, step.ok, step.detail, step.code, step.hint)
    if steps[-1].name != "api":
        yield Step("api", None)


@dataclass(frozen=True)
class FreshToken:
    """A token straight from the provider, with what its answer said about the grant."""

    token: str = field(repr=False)
    lifetime: float
    granted: list[str] | None = None  # scopes the provider says it granted, if it says
    refresh_token_expires_in: float | None = None  # Google: set when the refresh token expires


def fresh_delegated_token(ctx: Context, integration: Any) -> FreshToken:
    """A refresh through the token broker: a delegated refresh token rotates when redeemed, and
    only the broker keeps the newest one (in the token table, then the secret)."""
    from mailbroker import runtime
    from mailbroker.settings import TokenCacheEnv

    broker = runtime.build_token_broker(ctx.needs(TokenCacheEnv), ctx.integrations)
    try:
        token = broker.token_for_integration(integration, force_refresh=True)
    except AwsUnavailable as exc:
        if exc.__cause__ is None or aws_error_code(exc.__cause__) != "AccessDeniedException":
            raise
        # The key policy keeps the token cache's KMS context to the three functions, and the newest
        # refresh token is sealed in it: an operator's credentials may not open it.
        raise AwsUnavailable(
            f"{exc.message}: the token cache's key serves the functions only",
            hint="A delegated refresh token rotates, and its newest one is sealed in the token cache, "
            "which only the functions may open (the key policy). The keeper refreshes and checks it on "
            f"every run: see its health with 'mailbroker integration list', or run the live check "
            f"through the API (POST /v1/integrations/{integration.id}/check).",
        ) from None
    return FreshToken(token.access_token, max(token.expires_at - time.time(), 0.0))


def keyless_audience(integration: Any) -> str | None:
    """The audience a keyless integration mints web identity tokens for (None: not keyless)."""
    federated = getattr(integration, "federated", None)
    if federated is not None:
        return str(federated.audience)
    workload = getattr(integration, "workload_identity", None)
    return str(workload.token_audience) if workload is not None else None


def keyless_steps(integration: Any) -> Iterator[Step]:
    """The first keyless link: STS mints a JWT for the identity running doctor (the functions mint
    for their own roles, the subjects the provider must trust)."""
    audience = keyless_audience(integration)
    if audience is None:
        return
    import jwt
    from mailbroker import runtime
    from mailbroker.tokens.web_identity import WebIdentityTokens

    try:
        minted = WebIdentityTokens(runtime.sts_client).token(audience)
    except MailbrokerError as exc:
        yield Step("web identity", False, exc.message, exc.code, exc.hint)
        return
    claims = jwt.decode(minted, options={"verify_signature": False})
    yield Step(
        "web identity",
        True,
        f"STS minted a JWT: iss {claims.get('iss')}, sub {claims.get('sub')}, aud {claims.get('aud')} "
        "(the functions' tokens name their own roles: each must be trusted by the provider)",
    )


def fetch_fresh_token(integration: Any, http_timeout: float) -> FreshToken:
    """A token straight from the provider, bypassing every cache."""
    if isinstance(integration, GoogleIntegration):
        return _google_token(integration, http_timeout)
    from mailbroker import runtime
    from mailbroker.tokens.providers import TokenProviders
    from mailbroker.tokens.web_identity import WebIdentityTokens

    providers = TokenProviders(http_timeout=http_timeout, web_identity=WebIdentityTokens(runtime.sts_client))
    issued = providers.fetch(integration)
    return FreshToken(issued.access_token, issued.expires_in)


def _google_token(integration: GoogleIntegration, http_timeout: float) -> FreshToken:
    """A refresh asking for the integration's scope: Google answers invalid_scope when the user did
    not grant it, and names the scopes it did grant. A client whose consent screen is in 'Testing'
    gets refresh tokens that expire after 7 days, and the answer says so
    (``refresh_token_expires_in``)."""
    import requests
    from google.auth import exceptions
    from google.auth.transport.requests import Request
    from google.oauth2.credentials import Credentials

    creds = Credentials(
        token=None,
        refresh_token=integration.refresh_token.get_secret_value(),
        token_uri=integration.token_uri,
        client_id=integration.client_id,
        client_secret=integration.client_secret.get_secret_value(),
        scopes=[integration.scope],
    )
    session = requests.Session()
    session.request = _with_timeout(session.request, http_timeout)  # type: ignore[method-assign]
    seen: dict[str, float] = {}
    session.hooks["response"].append(lambda response, *a, **k: _refresh_expiry(response, seen))
    try:
        creds.refresh(Request(session=session))
    except exceptions.RefreshError as exc:
        data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        raise classify_token_error(
            error=data.get("error") or "server_error",
            description=data.get("error_description"),
            provider="google",
            context=context_of(integration),
        ) from None
    except (exceptions.TransportError, requests.RequestException, OSError) as exc:
        raise classify_transport_error(exc, "google") from None
    # google-auth keeps the expiry as a naive UTC datetime.
    lifetime = calendar.timegm(creds.expiry.timetuple()) - time.time() if creds.expiry else 3600.0
    return FreshToken(
        str(creds.token), lifetime, list(creds.granted_scopes or []), seen.get("refresh_token_expires_in")
    )


def _refresh_expiry(response: Any, seen: dict[str, float]) -> None:
    """Note ``refresh_token_expires_in`` of a successful token answer (google-auth drops it)."""
    if response.status_code != 200:
        return
    try:
        value = response.json().get("refresh_token_expires_in")
    except (ValueError, AttributeError):
        return
    if isinstance(value, int | float):
        seen["refresh_token_expires_in"] = float(value)


def _with_timeout(request: Any, timeout: float) -> Any:
    def bounded(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = timeout
        return request(method, url, *args, **kwargs)

    return bounded


def certificate_step(certificate: Any, now: float | None = None) -> Step:
    """Key and certificate belong together, and how long the certificate has left."""
    from mailbroker.tokens.credentials import (
        CERTIFICATE_WARNING_DAYS,
        certificate_facts,
        load_certificate_pair,
    )

    try:
        load_certificate_pair(certificate.private_key.get_secret_value(), certificate.certificate)
    except MailbrokerError as exc:
        return Step("cert", False, exc.message, exc.code, exc.hint)
    facts = certificate_facts(certificate.certificate)
    days = facts.days_left(time.time() if now is None else now)
    named = f"thumbprint {facts.thumbprint_sha1}, key matches"
    if days <= 0:
        error = MailbrokerError(f"expired on {facts.not_after_iso}", code="token_certificate_expired")
        return Step("cert", False, f"{named}; {error.message}", error.code, error.hint)
    left = f"{named}; valid until {facts.not_after_iso} ({int(days)} days left)"
    if days <= CERTIFICATE_WARNING_DAYS:
        return Step("cert", True, f"{left} - renew it soon: mailbroker cert create ID")
    return Step("cert", True, left)


def claim_steps(integration: Any, token: str, granted: list[str] | None) -> Iterator[Step]:
    """What the token says about itself, checked against what SMTP needs."""
    if isinstance(integration, MicrosoftIntegration):
        yield from _microsoft_claims(integration, token)
    elif isinstance(integration, GoogleIntegration):
        if granted is not None and GOOGLE_MAIL_SCOPE not in granted and granted:
            yield Step(
                "scope",
                False,
                f"the token grants {' '.join(granted)}, not {GOOGLE_MAIL_SCOPE}",
                "token_scope_invalid",
                f"SMTP needs the scope {GOOGLE_MAIL_SCOPE}: re-consent with "
                f"'mailbroker consent google {integration.id}'.",
            )
        elif integration.scope != GOOGLE_MAIL_SCOPE:
            yield Step(
                "scope",
                False,
                f"the integration asks for {integration.scope}",
                "token_scope_invalid",
                f"SMTP needs the scope {GOOGLE_MAIL_SCOPE}: set 'scope' to it (or remove it).",
            )
        else:
            yield Step("scope", True, f"the token grants {GOOGLE_MAIL_SCOPE}")
    elif isinstance(integration, GoogleServiceAccountIntegration):
        if integration.scope.split() != [GOOGLE_MAIL_SCOPE]:
            yield Step(
                "scope",
                False,
                f"the service account asks for {integration.scope}",
                "token_scope_invalid",
                f"SMTP needs {GOOGLE_MAIL_SCOPE}, granted to the service account's client id in the "
                "Workspace admin console (Security > API controls > Domain-wide delegation).",
            )
        else:
            yield Step(
                "scope",
                True,
                f"domain-wide delegation grants {GOOGLE_MAIL_SCOPE} for {integration.subject}",
            )


def _microsoft_claims(integration: MicrosoftIntegration, token: str) -> Iterator[Step]:
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        yield Step(
            "audience",
            False,
            "the access token is not a JWT",
            "token_scope_invalid",
            "Entra ID issues JWTs for Exchange Online: check the integration's authority.",
        )
        return
    audience = str(claims.get("aud", "")).rstrip("/")
    if audience in EXCHANGE_AUDIENCES:
        yield Step("audience", True, f"aud {audience} (Exchange Online)")
    else:
        yield Step(
            "audience",
            False,
            f"the token is for {audience or '(no audience)'}, not Exchange Online",
            "token_scope_invalid",
            "Request the scope https://outlook.office365.com/.default (the integration asks for "
            f"{integration.scope}); a token for another resource such as Microsoft Graph is refused "
            "by SMTP.",
        )
    roles = [str(role) for role in claims.get("roles") or []]
    if SEND_AS_APP in roles:
        yield Step("role", True, f"roles include {SEND_AS_APP}")
    elif MAIL_SEND in roles:
        yield Step(
            "role",
            False,
            f"the token has {MAIL_SEND} but no {SEND_AS_APP} role",
            "token_scope_invalid",
            _graph_instead_of_smtp_hint(integration),
        )
    else:
        yield Step(
            "role",
            False,
            f"the token has no {SEND_AS_APP} role (roles: {', '.join(roles) or 'none'})",
            "token_scope_invalid",
            f"Add the application permission Office 365 Exchange Online > {SEND_AS_APP} to the app "
            "registration and grant admin consent; 'mailbroker setup microsoft "
            f"{integration.id}' prints the consent URL.",
        )
    tenant = str(claims.get("tid", ""))
    if tenant.lower() == integration.tenant_id.lower():
        yield Step("tenant", True, f"tid {tenant} matches")
    elif not _is_guid(integration.tenant_id):
        yield Step("tenant", True, f"tid {tenant} (tenant configured by name, {integration.tenant_id})")
    else:
        yield Step(
            "tenant",
            False,
            f"the token's tenant {tenant or '(none)'} is not {integration.tenant_id}",
            "token_invalid_client",
            "The app authenticated in another tenant: set tenant_id to the mailbox's tenant (Entra "
            "admin center > Overview > Tenant ID).",
        )


def _graph_instead_of_smtp_hint(integration: MicrosoftIntegration) -> str:
    consent = (
        microsoft_admin_consent_url(integration.authority, integration.tenant_id, integration.client_id)
        or ENTRA_ADMIN_CONSENT
    )
    return (
        f"{MAIL_SEND} lets an app send through Microsoft Graph, not SMTP: SMTP AUTH needs the "
        f"application permission Office 365 Exchange Online > {SEND_AS_APP} (App registrations > "
        f"{integration.client_id} > API permissions > Add a permission > APIs my organization uses > "
        f"Office 365 Exchange Online > Application permissions), then admin consent at "
        f"{consent}."
    )


def graph_permission_steps(
    integration: MicrosoftIntegration, token: str, http_timeout: float
) -> Iterator[Step]:
    """When the Exchange token carries no role at all, whether the app was given Graph's Mail.Send
    instead: a token for Microsoft Graph says (the common mix-up of the seeds)."""
    if _roles(token) or integration.scope != DEFAULT_MICROSOFT_SCOPE:
        return
    from mailbroker.tokens.providers import TokenProviders

    graph = integration.model_copy(update={"scope": GRAPH_SCOPE})
    try:
        graph_token = TokenProviders(http_timeout=http_timeout).fetch(graph).access_token
    except MailbrokerError:
        return  # no Graph grant either: the role step already says what to add
    if MAIL_SEND in _roles(graph_token):
        yield Step(
            "graph",
            False,
            f"the app holds Microsoft Graph {MAIL_SEND}, which SMTP does not use",
            "token_scope_invalid",
            _graph_instead_of_smtp_hint(integration),
        )


def _roles(token: str) -> list[str]:
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return []
    return [str(role) for role in claims.get("roles") or []]


def service_principal_steps(
    integration: MicrosoftIntegration, token: str, smtp: list[Step]
) -> Iterator[Step]:
    """After a 535 5.7.3 to a token that has the right audience and role, the likely cause is the
    Exchange service principal: registered with the App registration's Object ID instead of the
    Enterprise application's. The token's ``oid`` is the right one; name it."""
    auth = next((step for step in smtp if step.name == "auth"), None)
    if (
        auth is None
        or auth.ok is not False
        or auth.code != "smtp_auth_failed"
        or SEND_AS_APP not in _roles(token)
    ):
        return
    import jwt

    oid = str(jwt.decode(token, options={"verify_signature": False}).get("oid", "")) or "<oid>"
    yield Step(
        "principal",
        False,
        f"Exchange refused a valid {SEND_AS_APP} token; the app's Enterprise application Object ID is {oid}",
        "smtp_auth_failed",
        "Exchange must know the app's service principal by the Enterprise application's Object ID "
        f"({oid}, the token's oid), not the Object ID shown under App registrations: "
        f"New-ServicePrincipal -AppId {integration.client_id} -ObjectId {oid}, then "
        f"Add-MailboxPermission -Identity {integration.username} -User {oid} -AccessRights FullAccess "
        "(Remove-ServicePrincipal the one registered with the wrong id).",
    )


def consent_screen_steps(integration: Any, fresh: FreshToken) -> Iterator[Step]:
    """Google: a refresh token that expires within 7 days comes from a consent screen in Testing."""
    left = fresh.refresh_token_expires_in
    if not isinstance(integration, GoogleIntegration) or left is None:
        return
    if left > TESTING_REFRESH_LIFETIME:
        yield Step("consent", True, f"the refresh token expires in {int(left // 86400)} days")
        return
    yield Step(
        "consent",
        False,
        f"the refresh token expires in {left / 86400:.1f} days: the OAuth consent screen is in 'Testing'",
        "token_invalid_grant",
        "Google ends refresh tokens of apps in 'Testing' after 7 days and mail stops then: publish the "
        "app (Google Cloud console > APIs & Services > OAuth consent screen > Publish app), then "
        f"consent again so the new token has no end date: 'mailbroker consent google {integration.id}'.",
    )


def expiry_steps(integration: Any, now: float) -> Iterator[Step]:
    """A Microsoft client secret (client_secret_expires_at) or certificate that ends within 30 days."""
    if not isinstance(integration, MicrosoftIntegration):
        return
    ends = _certificate_end(integration)
    what = "client certificate"
    if ends is None:
        ends, what = _secret_end(integration), "client secret"
    if ends is None:
        yield Step(
            "expiry", True, "no client_secret_expires_at: the keeper cannot warn before the secret ends"
        )
        return
    if ends - now > EXPIRY_WINDOW:
        yield Step("expiry", True, f"the {what} is valid until {_day(ends)}")
        return
    verb = "ended" if ends <= now else "ends"
    yield Step(
        "expiry",
        False,
        f"the {what} {verb} on {_day(ends)} (in {max(int((ends - now) // 86400), 0)} days)",
        "token_invalid_client",
        f"Add a new client {what.split()[-1]} before the old one ends: Entra admin center > App "
        f"registrations > {integration.client_id} > Certificates & secrets, then store it with "
        "'mailbroker integration add' (with client_secret_expires_at) and delete the old one.",
    )


def _secret_end(integration: MicrosoftIntegration) -> float | None:
    import datetime as dt

    value = integration.client_secret_expires_at
    if not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def _certificate_end(integration: Any) -> float | None:
    pem = getattr(getattr(integration, "client_certificate", None), "certificate", None)
    if not isinstance(pem, str):
        return None
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc.timestamp()
    except ValueError:
        return None


def _day(moment: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(moment))


def _is_guid(text: str) -> bool:
    import uuid

    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def smtp_steps(integration: Any, token: str | None) -> Iterator[Step]:
    from mailbroker.smtp import BasicAuth, XOAuth2Auth, run_check

    auth: Any
    if token is None:
        auth = BasicAuth(integration.password)
    else:
        fixed = token
        auth = XOAuth2Auth(lambda fresh: fixed)
    try:
        steps = run_check(integration.smtp, integration.username, auth)
    except MailbrokerError as exc:
        yield Step("connect", False, exc.message, exc.code, exc.hint)
        yield from _skipped("connect")
        return
    for step in steps:
        yield Step(step.name, step.ok, step.detail, step.code, step.hint)
    if steps and not steps[-1].ok:
        yield from _skipped(steps[-1].name)


def _skipped(after: str) -> Iterator[Step]:
    """The steps that did not run because ``after`` failed."""
    if after in SKIPPABLE:
        for name in SKIPPABLE[SKIPPABLE.index(after) + 1 :]:
            yield Step(name, None)
