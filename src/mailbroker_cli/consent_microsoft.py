"""``mailbroker consent microsoft ID``: a user's delegated consent for a ``microsoft_delegated``
integration, through MSAL.

Two flows, both MSAL's own: the device code flow (the default: it works on a headless machine and
over SSH — the user opens the verification page on any device and types the code), and the
authorisation code flow with PKCE on a loopback redirect (``--browser``), where a browser runs on
this machine. The device code flow is for public clients ("Allow public client flows" on the app
registration); a confidential client (secret or certificate) uses the browser flow. Either way the
refresh token goes straight into the integration's secret and is never printed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mailbroker.errors import InvalidIntegration, UnknownIntegration, classify_token_error
from mailbroker.integrations import (
    DEFAULT_DELEGATED_SCOPE,
    DEFAULT_MICROSOFT_AUTHORITY,
    Integration,
    MicrosoftDelegatedIntegration,
    parse_integration,
    unredacted,
)

from mailbroker_cli.context import CliError, Context
from mailbroker_cli.integrations import (
    apply_mailbox_flags,
    report_invalid,
    require_for_new,
    secret_from_flags,
)
from mailbroker_cli.output import Output

_RESERVED = frozenset({"offline_access", "openid", "profile"})


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    microsoft = sub.add_parser(
        "microsoft",
        parents=[common],
        help="Microsoft 365 / Outlook.com: a user's delegated consent; stores the refresh token",
        description="Sign the mailbox's user in (device code by default, or --browser for the "
        "authorisation code flow with PKCE on http://localhost:PORT) and store the refresh token in "
        "the integration's secret. Creates a microsoft_delegated integration when it does not exist "
        "yet (give --tenant-id, --client-id and --username).",
    )
    microsoft.add_argument("id")
    microsoft.add_argument("--tenant-id", help="directory id, or common, organizations, consumers")
    microsoft.add_argument("--client-id")
    microsoft.add_argument(
        "--client-secret", metavar="-", help="'-' reads a confidential client's secret from stdin"
    )
    microsoft.add_argument("--client-secret-file", metavar="FILE", help="read the client secret from FILE")
    microsoft.add_argument("--username", help="the mailbox (login hint)")
    microsoft.add_argument("--sender", action="append", metavar="EMAIL[=NAME]")
    microsoft.add_argument("--smtp-host", help="default smtp.office365.com")
    microsoft.add_argument("--smtp-port", type=int, help="default 587")
    microsoft.add_argument("--security", choices=("starttls", "tls", "none"))
    microsoft.add_argument("--authority", help=f"default {DEFAULT_MICROSOFT_AUTHORITY}")
    microsoft.add_argument(
        "--transport",
        choices=("smtp", "graph"),
        help="how mail leaves (default smtp); graph asks for the scope "
        "https://graph.microsoft.com/Mail.Send offline_access",
    )
    microsoft.add_argument("--scope", help=f"default {DEFAULT_DELEGATED_SCOPE} (for smtp)")
    flows = microsoft.add_mutually_exclusive_group()
    flows.add_argument("--device-code", action="store_true", help="device code flow (the default)")
    flows.add_argument(
        "--browser",
        nargs="?",
        const="",
        metavar="NAME",
        help="authorisation code flow with PKCE; NAME: a browser Python's webbrowser module knows",
    )
    microsoft.add_argument(
        "--no-browser", action="store_true", help="with --browser: print the URL, open nothing"
    )
    microsoft.add_argument(
        "--port", type=int, default=0, help="loopback port for --browser (default: any free)"
    )
    microsoft.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the sign-in")
    microsoft.set_defaults(handler=consent_microsoft)


def consent_microsoft(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    store = ctx.integrations
    try:
        existing = store.get(args.id)
    except (UnknownIntegration, InvalidIntegration):
        existing = None
    if existing is not None and existing.provider != "microsoft_delegated":
        raise CliError(
            f"integration {args.id!r} is a {existing.provider} integration, not microsoft_delegated"
        )
    document = _document(args, existing)
    try:
        # every other field, before signing in; the scope follows the transport unless given
        planned = parse_integration(document | {"refresh_token": "placeholder"})
    except InvalidIntegration as exc:
        return report_invalid(exc, out, from_flags=True)
    app = _msal_app(document)
    scopes = _scopes(planned)
    if args.browser is not None:
        result = _browser_flow(app, scopes, document.get("username"), args, out)
    else:
        if not hasattr(app, "initiate_device_flow"):
            raise CliError(
                "the device code flow is for public clients; this integration has a client credential",
                hint="Use --browser (authorisation code with PKCE), or enable 'Allow public client flows' "
                "on the app registration and drop the client secret or certificate.",
            )
        result = _device_flow(app, scopes, args, out)
    refresh_token = _refresh_token_of(result)
    integration = parse_integration(document | {"refresh_token": refresh_token})
    store.put(integration)
    if out.as_json:
        out.json({"id": integration.id, "refresh_token_stored": True})
    else:
        out.line(f"{out.mark(True)} refresh token stored in secret {store.secret_name(integration.id)}")
        out.note(f"check it: mailbroker doctor {integration.id}")
    return 0


def _scopes(integration: Integration) -> list[str]:
    """What to ask the user for: the integration's scope (its transport's by default), without the
    scopes MSAL adds itself."""
    scope = (
        integration.scope
        if isinstance(integration, MicrosoftDelegatedIntegration)
        else DEFAULT_DELEGATED_SCOPE
    )
    return [s for s in scope.split() if s not in _RESERVED]


def _document(args: argparse.Namespace, existing: Any) -> dict[str, Any]:
    document: dict[str, Any] = (
        unredacted(existing)
        if existing is not None
        else {
            "id": args.id,
            "provider": "microsoft_delegated",
            "smtp": {"host": "smtp.office365.com", "port": 587},
        }
    )
    document.pop("refresh_token", None)
    if args.transport and not args.scope:
        document.pop("scope", None)  # the new transport's own scope
    for key in ("tenant_id", "client_id", "username", "authority", "scope", "transport"):
        if getattr(args, key):
            document[key] = getattr(args, key)
    secret = secret_from_flags(args, "client_secret")
    if secret:
        document["client_secret"] = secret
        document.pop("client_certificate", None)
    apply_mailbox_flags(document, args)
    require_for_new(
        document,
        args.id,
        ("tenant_id", "client_id", "username"),
        hint="Register an app in Entra admin center > App registrations (for Outlook.com accounts: "
        "'personal Microsoft accounts', tenant consumers), add the delegated permission "
        "Office 365 Exchange Online > SMTP.Send, and enable 'Allow public client flows' for the "
        "device code flow.",
    )
    return document


def _msal_app(document: dict[str, Any]) -> Any:
    import msal
    from mailbroker.tokens.credentials import msal_credential

    integration = parse_integration(document | {"refresh_token": "placeholder"})
    if not isinstance(integration, MicrosoftDelegatedIntegration):
        raise CliError(f"integration {integration.id!r} is not a microsoft_delegated integration")
    credential, assertion = msal_credential(integration)
    options: dict[str, Any] = {
        "authority": f"{integration.authority}/{integration.tenant_id}",
        "instance_discovery": integration.authority == DEFAULT_MICROSOFT_AUTHORITY,
    }
    if credential is None:
        return msal.PublicClientApplication(integration.client_id, **options)
    app = msal.ConfidentialClientApplication(integration.client_id, client_credential=credential, **options)
    if assertion is not None:
        assertion.audience = app.authority.token_endpoint
    return app


def _device_flow(app: Any, scopes: list[str], args: argparse.Namespace, out: Output) -> dict[str, Any]:
    flow = app.initiate_device_flow(scopes=scopes)
    if "user_code" not in flow:
        raise _refused(flow)
    # MSAL's message names the page and the code: what the user needs on their other device.
    out.note(str(flow.get("message") or f"Open {flow['verification_uri']} and enter {flow['user_code']}"))
    flow["expires_at"] = min(float(flow.get("expires_at", 0) or 0) or 1e18, time.time() + args.timeout)
    result = app.acquire_token_by_device_flow(flow)
    if "error" in result and result.get("error") in {
        "authorization_pending",
        "expired_token",
        "code_expired",
    }:
        raise CliError(
            f"no sign-in completed within {args.timeout:.0f} s",
            hint="Run it again and enter the code sooner, or raise --timeout.",
            code="consent_timeout",
        )
    return dict(result)


def _browser_flow(
    app: Any, scopes: list[str], login_hint: str | None, args: argparse.Namespace, out: Output
) -> dict[str, Any]:
    from msal.oauth2cli.authcode import AuthCodeReceiver

    with AuthCodeReceiver(port=args.port or None) as receiver:
        redirect_uri = f"http://localhost:{receiver.get_port()}"
        flow = app.initiate_auth_code_flow(
            scopes, redirect_uri=redirect_uri, login_hint=login_hint, response_mode="form_post"
        )
        out.note("Sign in and consent in the browser; if it does not open, visit:")
        out.note(f"  {flow['auth_uri']}")
        out.note(f"Waiting for Microsoft to redirect to {redirect_uri} …")
        response = receiver.get_auth_response(
            auth_uri=None if args.no_browser else flow["auth_uri"],
            state=flow["state"],
            timeout=args.timeout,
            browser_name=args.browser or None,
            auth_uri_callback=lambda uri: None,  # already printed above
            success_template="mailbroker received the authorisation; you may close this window.",
        )
    if not response:
        raise CliError(
            f"no sign-in arrived within {args.timeout:.0f} s",
            hint="Open the printed URL in a browser on this machine, or use the device code flow.",
            code="consent_timeout",
        )
    if response.get("error") in {"access_denied", "consent_required"}:
        raise CliError("consent was refused in the browser", code="consent_denied")
    return dict(app.acquire_token_by_auth_code_flow(flow, response, scopes=scopes))


def _refresh_token_of(result: dict[str, Any]) -> str:
    if result.get("error") in {"authorization_declined", "access_denied"}:
        raise CliError("the user declined the sign-in", code="consent_denied")
    if "error" in result:
        raise _refused(result)
    if not result.get("refresh_token"):
        raise CliError(
            "Microsoft returned no refresh token",
            hint="The scope must include offline_access (it does by default).",
            code="no_refresh_token",
        )
    return str(result["refresh_token"])


def _refused(result: dict[str, Any]) -> Exception:
    return classify_token_error(
        error=result.get("error"),
        description=result.get("error_description"),
        error_codes=result.get("error_codes"),
        provider="microsoft_delegated",
    )
