"""``mailbroker consent google ID``: the loopback authorisation-code flow for a Gmail mailbox.

google-auth-oauthlib's ``InstalledAppFlow`` runs a one-request HTTP server on ``localhost`` that
catches the authorisation code, exchanges it (with PKCE) and returns the credentials; the refresh
token is then validated into the integration and written to its secret. The client's endpoints
come from the integration, so the same command works against the sandbox.

Without a browser on this machine (a server, an SSH session), or with ``--no-browser``, the
console flow runs instead: the URL is printed, the operator approves in a browser anywhere, and
pastes back the address the browser was sent to (``http://localhost:PORT/?code=…&state=…``, a
page that will not load on another machine) or the code alone.
"""

from __future__ import annotations

import argparse
import sys
import webbrowser
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from mailbroker.errors import InvalidIntegration, UnknownIntegration, classify_token_error
from mailbroker.integrations import DEFAULT_GOOGLE_TOKEN_URI, GOOGLE_MAIL_SCOPE, parse_integration, unredacted

from mailbroker_cli.context import CliError, Context
from mailbroker_cli.integrations import (
    apply_mailbox_flags,
    read_json,
    report_invalid,
    require_for_new,
    secret_from_flags,
)
from mailbroker_cli.output import Output

GOOGLE_AUTH_URI = "https://accounts.google.com/o/oauth2/auth"
TESTING_WARNING = (
    "Google deletes refresh tokens after 7 days when the OAuth consent screen is in 'Testing' "
    "publishing status. Publish the app ('In production') in Google Cloud console > APIs & Services "
    "> OAuth consent screen, or this integration needs re-consent every week."
)


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("consent", help="obtain a refresh token through the provider's consent")
    sub = group.add_subparsers(dest="provider", required=True, metavar="{google,microsoft}")
    google = sub.add_parser(
        "google",
        parents=[common],
        help="Gmail: loopback consent flow; stores the refresh token",
        description="Open Google's consent screen (offline access, https://mail.google.com/), catch the "
        "code on http://localhost:PORT, exchange it and store the refresh token in the integration's "
        "secret. Creates the integration when it does not exist yet (give --client-id, "
        "--client-secret and --username, or --client-secrets).",
    )
    google.add_argument("id")
    google.add_argument(
        "--client-secrets", metavar="FILE", help="the OAuth client JSON downloaded from Google"
    )
    google.add_argument("--client-id")
    google.add_argument("--client-secret", metavar="-", help="'-' reads the client secret from stdin")
    google.add_argument("--client-secret-file", metavar="FILE", help="read the client secret from FILE")
    google.add_argument("--username", help="the Gmail / Workspace mailbox (login hint)")
    google.add_argument("--sender", action="append", metavar="EMAIL[=NAME]")
    google.add_argument("--smtp-host", help="default smtp.gmail.com")
    google.add_argument("--smtp-port", type=int, help="default 587")
    google.add_argument("--security", choices=("starttls", "tls", "none"))
    google.add_argument("--token-uri", help=f"token endpoint (default {DEFAULT_GOOGLE_TOKEN_URI})")
    google.add_argument("--auth-uri", help=f"authorisation endpoint (default {GOOGLE_AUTH_URI})")
    google.add_argument(
        "--port", type=int, default=0, help="loopback port for the redirect (default: any free)"
    )
    google.add_argument(
        "--no-browser",
        action="store_true",
        help="print the URL and read back the address the browser was sent to (for SSH; "
        "also used when no browser is found)",
    )
    google.add_argument("--browser", help="the browser to open (a name Python's webbrowser module knows)")
    google.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the consent")
    google.set_defaults(handler=consent_google)
    from mailbroker_cli import consent_microsoft

    consent_microsoft.register(sub, common)


def consent_google(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    store = ctx.integrations
    try:
        existing = store.get(args.id)
    except UnknownIntegration:
        existing = None
    except InvalidIntegration:
        existing = None  # a half-made integration is rebuilt from the flags
    if existing is not None and existing.provider != "google":
        raise CliError(f"integration {args.id!r} is a {existing.provider} integration, not google")
    document = _document(args, existing)
    auth_uri = args.auth_uri or authorization_uri_for(document["token_uri"])
    client_config = {
        "installed": {
            "client_id": document["client_id"],
            "client_secret": document["client_secret"],
            "auth_uri": auth_uri,
            "token_uri": document["token_uri"],
            "redirect_uris": ["http://localhost"],
        }
    }
    refresh_token = run_consent(client_config, document.get("username"), args, out)
    document["refresh_token"] = refresh_token
    try:
        integration = parse_integration(document)
    except InvalidIntegration as exc:
        return report_invalid(exc, out, from_flags=True)
    store.put(integration)
    if out.as_json:
        out.json({"id": integration.id, "refresh_token_stored": True, "warning": TESTING_WARNING})
    else:
        out.line(f"{out.mark(True)} refresh token stored in secret {store.secret_name(integration.id)}")
        out.warn(TESTING_WARNING)
        out.note(f"check it: mailbroker doctor {integration.id}")
    return 0


def _document(args: argparse.Namespace, existing: Any) -> dict[str, Any]:
    document: dict[str, Any] = (
        unredacted(existing)
        if existing is not None
        else {"id": args.id, "provider": "google", "smtp": {"host": "smtp.gmail.com", "port": 587}}
    )
    if args.client_secrets:
        _read_client_secrets(args, document)
    for key in ("client_id", "username", "token_uri"):
        value = getattr(args, key)
        if value:
            document[key] = value
    secret = secret_from_flags(args, "client_secret")
    if secret:
        document["client_secret"] = secret
    apply_mailbox_flags(document, args)
    document.setdefault("token_uri", DEFAULT_GOOGLE_TOKEN_URI)
    require_for_new(
        document,
        args.id,
        ("client_id", "client_secret", "username"),
        hint="Give the OAuth client (Desktop app) from Google Cloud console > APIs & Services > "
        "Credentials with --client-secrets FILE, or --client-id and --client-secret; and the mailbox "
        "with --username.",
    )
    return document


def _read_client_secrets(args: argparse.Namespace, document: dict[str, object]) -> None:
    """The OAuth client from Google Cloud console's JSON download (``installed`` or ``web``)."""
    config = read_json(args.client_secrets)
    if not isinstance(config, dict):
        raise CliError(f"{args.client_secrets} is not an OAuth client JSON object")
    section = config.get("installed") or config.get("web") or {}
    for key in ("client_id", "client_secret", "token_uri"):
        if section.get(key):
            document[key] = section[key]
    if section.get("auth_uri") and not args.auth_uri:
        args.auth_uri = section["auth_uri"]


def authorization_uri_for(token_uri: str) -> str:
    """Google's consent endpoint, or the one beside a non-Google token endpoint (the sandbox serves
    ``/o/oauth2/auth`` next to ``/token``)."""
    if token_uri == DEFAULT_GOOGLE_TOKEN_URI:
        return GOOGLE_AUTH_URI
    parts = urlsplit(token_uri)
    return urlunsplit((parts.scheme, parts.netloc, "/o/oauth2/auth", "", ""))


def browser_available(name: str | None) -> bool:
    """Whether Python's webbrowser module can open a browser here (none on a server or over SSH)."""
    try:
        webbrowser.get(name)
    except webbrowser.Error:
        return False
    return True


def run_consent(
    client_config: dict[str, Any], login_hint: str | None, args: argparse.Namespace, out: Output
) -> str:
    from oauthlib.oauth2.rfc6749.errors import OAuth2Error

    try:
        if args.no_browser:
            credentials = console_consent(client_config, login_hint, args, out)
        elif not browser_available(args.browser):
            out.note("No browser was found on this machine: approving from a browser anywhere instead.")
            credentials = console_consent(client_config, login_hint, args, out)
        else:
            credentials = loopback_consent(client_config, login_hint, args, out)
    except OAuth2Error as exc:
        if exc.error == "access_denied":
            raise CliError("consent was refused in the browser", code="consent_denied") from None
        raise classify_token_error(error=exc.error, description=exc.description, provider="google") from None
    if not credentials.refresh_token:
        raise CliError(
            "Google returned no refresh token",
            hint="Remove the app's access at https://myaccount.google.com/permissions and run this again "
            "(a refresh token is only issued with offline access on a fresh consent).",
            code="no_refresh_token",
        )
    return str(credentials.refresh_token)


def console_consent(
    client_config: dict[str, Any], login_hint: str | None, args: argparse.Namespace, out: Output
) -> Any:
    """Print the consent URL; read back the redirected address (or the code) from stdin."""
    from google_auth_oauthlib.flow import InstalledAppFlow

    flow = InstalledAppFlow.from_client_config(client_config, scopes=[GOOGLE_MAIL_SCOPE])
    flow.redirect_uri = f"http://localhost:{args.port or 8085}/"
    extra = {"login_hint": login_hint} if login_hint else {}
    url, state = flow.authorization_url(access_type="offline", prompt="consent", **extra)
    out.note("Open this URL in a browser (on any machine) and approve access:")
    out.note(f"  {url}")
    out.note(
        f"The browser is then sent to {flow.redirect_uri}?code=… — a page that may not load. Copy that "
        "whole address from the address bar (or just the code) and paste it here:"
    )
    pasted = sys.stdin.readline().strip()
    code = code_from_paste(pasted, state)
    flow.fetch_token(code=code)
    return flow.credentials


def code_from_paste(pasted: str, state: str) -> str:
    """The authorisation code in a pasted redirect address (its ``state`` checked) or a bare code."""
    if not pasted:
        raise CliError(
            "nothing was pasted",
            hint="Paste the address the browser was sent to after approving (http://localhost:…?code=…).",
            code="consent_timeout",
        )
    if "://" not in pasted and "code=" not in pasted:
        return unquote(pasted)  # copied out of the address bar, it may still be percent-encoded
    query = parse_qs(urlsplit(pasted).query or pasted.partition("?")[2] or pasted)
    if query.get("error"):
        if query["error"][0] == "access_denied":
            raise CliError("consent was refused in the browser", code="consent_denied")
        raise CliError(f"the consent screen answered {query['error'][0]}", code="consent_denied")
    if query.get("state", [state])[0] != state:
        raise CliError(
            "the pasted address belongs to another consent attempt (its state does not match)",
            hint="Paste the address from the consent started by this command.",
            code="consent_denied",
        )
    codes = query.get("code")
    if not codes:
        raise CliError(
            "the pasted address holds no code",
            hint="Paste the whole address the browser was sent to after approving (it has ?code=…).",
            code="consent_denied",
        )
    return codes[0]


def loopback_consent(
    client_config: dict[str, Any], login_hint: str | None, args: argparse.Namespace, out: Output
) -> Any:
    from google_auth_oauthlib.flow import InstalledAppFlow, WSGITimeoutError

    class LoopbackFlow(InstalledAppFlow):
        """Announces the consent URL on stderr (stdout stays clean for --json)."""

        def authorization_url(self, **kwargs: Any) -> Any:
            url, state = super().authorization_url(**kwargs)
            out.note("Opening the consent screen in your browser; if it does not open, visit:")
            out.note(f"  {url}")
            out.note(f"Waiting for Google to redirect to {self.redirect_uri} …")
            return url, state

    flow = LoopbackFlow.from_client_config(client_config, scopes=[GOOGLE_MAIL_SCOPE])
    extra = {"login_hint": login_hint} if login_hint else {}
    try:
        credentials = flow.run_local_server(
            host="localhost",
            bind_addr="127.0.0.1",
            port=args.port,
            open_browser=True,
            browser=args.browser,
            authorization_prompt_message="",
            success_message="mailbroker received the authorisation; you may close this window.",
            timeout_seconds=args.timeout,
            access_type="offline",
            prompt="consent",
            **extra,
        )
    except WSGITimeoutError:
        raise CliError(
            f"no consent arrived within {args.timeout:.0f} s",
            hint="Open the printed URL in a browser on this machine, raise --timeout, or use "
            "--no-browser to approve from another machine and paste the address back.",
            code="consent_timeout",
        ) from None
    except webbrowser.Error:
        out.note("The browser could not be started: approving from a browser anywhere instead.")
        return console_consent(client_config, login_hint, args, out)
    return credentials
