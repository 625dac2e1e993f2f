"""``mailbroker doctor ID``: every step between a stored secret and an accepted SMTP AUTH, each with
✓ or ✗ and a hint — secret, token (with the JWT's claims decoded, not verified), TCP/TLS, EHLO,
AUTH, QUIT. No mail is sent. The token comes fresh from the provider, bypassing the cache, so a
wrong secret shows even while a cached token is still valid."""

from __future__ import annotations

import argparse
import calendar
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mailbroker.errors import MailbrokerError, classify_exception, classify_token_error
from mailbroker.integrations import (
    GOOGLE_MAIL_SCOPE,
    BasicIntegration,
    GoogleIntegration,
    GoogleServiceAccountIntegration,
    MicrosoftIntegration,
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
# Steps that depend on the one before; the token's claim checks do not stop the SMTP steps.
SKIPPABLE = ("secret", "token", "connect", "tls", "ehlo", "auth", "quit")


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
    token: str | None = None
    if isinstance(integration, BasicIntegration):
        yield Step("token", True, "basic authentication (AUTH PLAIN/LOGIN): no token needed")
    else:
        try:
            token, lifetime, granted = fetch_fresh_token(integration, ctx.settings.http_timeout)
        except Exception as exc:
            error = classify_exception(exc)
            yield Step("token", False, error.message, error.code, error.hint)
            yield from _skipped("token")
            return
        yield Step("token", True, f"access token issued by the provider, valid for {int(lifetime)} s")
        yield from claim_steps(integration, token, granted)
    yield from smtp_steps(integration, token)


def fetch_fresh_token(integration: Any, http_timeout: float) -> tuple[str, float, list[str] | None]:
    """(token, lifetime, scopes the provider says it granted, if it says) straight from the provider."""
    if isinstance(integration, GoogleIntegration):
        return _google_token(integration, http_timeout)
    from mailbroker.tokens.providers import TokenProviders

    issued = TokenProviders(http_timeout=http_timeout).fetch(integration)
    return issued.access_token, issued.expires_in, None


def _google_token(integration: GoogleIntegration, http_timeout: float) -> tuple[str, float, list[str]]:
    """A refresh asking for the integration's scope: Google answers invalid_scope when the user did
    not grant it, and names the scopes it did grant."""
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
    try:
        creds.refresh(Request(session=session))
    except exceptions.RefreshError as exc:
        data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        raise classify_token_error(
            error=data.get("error") or "server_error",
            description=data.get("error_description"),
            provider="google",
        ) from None
    except (exceptions.TransportError, requests.RequestException, OSError) as exc:
        raise classify_token_error(description=type(exc).__name__, provider="google") from None
    # google-auth keeps the expiry as a naive UTC datetime.
    lifetime = calendar.timegm(creds.expiry.timetuple()) - time.time() if creds.expiry else 3600.0
    return str(creds.token), lifetime, list(creds.granted_scopes or [])


def _with_timeout(request: Any, timeout: float) -> Any:
    def bounded(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = timeout
        return request(method, url, *args, **kwargs)

    return bounded


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
