"""``mailbroker integration add|list|show|remove``."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from mailbroker.errors import InvalidIntegration, UnknownIntegration
from mailbroker.integrations import parse_integration

from mailbroker_cli.context import CliError, Context
from mailbroker_cli.output import Output, ago

PROVIDERS = ("microsoft", "google", "google_service_account", "oauth2", "basic")
TRANSPORTS = ("smtp", "graph", "gmail_api")
DEFAULT_SMTP = {
    "microsoft": "smtp.office365.com",
    "google": "smtp.gmail.com",
    "google_service_account": "smtp.gmail.com",
}
# flag destination -> secret field. A secret never comes from the command line itself (argv is in
# `ps`, shell history and audit logs): "-" reads it from stdin, --<flag>-file from a file, and a
# missing one is prompted for on a terminal.
SECRET_FLAGS = {"client_secret": "client secret", "refresh_token": "refresh token", "password": "password"}
REQUIRED_SECRETS = {
    "microsoft": ("client_secret",),
    "google": ("client_secret", "refresh_token"),
    "oauth2": ("client_secret",),
    "basic": ("password",),
}
# Integration field -> the flag that sets it (to name problems the way the user typed them).
FIELD_FLAGS = {
    "smtp.host": "--smtp-host",
    "smtp.port": "--smtp-port",
    "smtp.security": "--security",
    "smtp": "--smtp-host/--security",
    "tenant_id": "--tenant-id",
    "client_id": "--client-id",
    "client_secret": "--client-secret",
    "client_secret_expires_at": "--client-secret-expires-at",
    "refresh_token": "--refresh-token",
    "token_uri": "--token-uri",
    "token_url": "--token-url",
    "service_account_info": "--service-account-file",
    "subject": "--subject",
    "password": "--password",
    "username": "--username",
    "authority": "--authority",
    "scope": "--scope",
    "transport": "--transport",
    "graph_endpoint": "--graph-endpoint",
    "gmail_endpoint": "--gmail-endpoint",
    "allowed_callers": "--allowed-caller",
}


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("integration", help="register, list, show and remove integrations")
    sub = group.add_subparsers(dest="action", required=True, metavar="{add,list,show,remove}")

    add = sub.add_parser(
        "add",
        parents=[common],
        help="validate an integration and write its secret",
        description="Validate an integration and write it as the secret <SECRET_PREFIX><id>. Every "
        "problem is named; nothing is written unless the whole integration is valid. Secrets never "
        "come from the command line: '-' reads one from stdin, --<name>-file from a file, and a "
        "missing one is asked for on a terminal.",
    )
    add.add_argument("id", nargs="?", help="integration id (default: the file's 'id')")
    add.add_argument("--from-file", metavar="FILE", help="the integration's JSON ('-' for stdin)")
    add.add_argument("--provider", choices=PROVIDERS)
    add.add_argument("--username", help="the mailbox that authenticates (SMTP AUTH user)")
    add.add_argument("--smtp-host")
    add.add_argument("--smtp-port", type=int)
    add.add_argument("--security", choices=("starttls", "tls", "none"))
    add.add_argument(
        "--sender", action="append", metavar="EMAIL[=NAME]", help="an allowed From address (repeatable)"
    )
    add.add_argument("--usage", action="append", help="an enabled usage, e.g. transactional (repeatable)")
    add.add_argument("--messages-per-minute", type=int)
    add.add_argument("--max-connections", type=int)
    add.add_argument("--smtp-check", action="store_true", help="the keeper runs the live check")
    add.add_argument(
        "--transport",
        choices=TRANSPORTS,
        help="how mail leaves: SMTP (default), Microsoft Graph sendMail (microsoft), or the Gmail API "
        "(google, google_service_account)",
    )
    add.add_argument("--graph-endpoint", metavar="URL", help="Microsoft Graph base URL (sovereign clouds)")
    add.add_argument("--gmail-endpoint", metavar="URL", help="Gmail API base URL")
    add.add_argument("--tenant-id")
    add.add_argument("--client-id")
    add.add_argument("--client-secret", metavar="-", help="'-' reads the client secret from stdin")
    add.add_argument("--client-secret-file", metavar="FILE", help="read the client secret from FILE")
    add.add_argument("--client-secret-expires-at", metavar="DATE", help="ISO 8601, e.g. 2027-05-01")
    add.add_argument("--authority", help="Microsoft authority (sovereign clouds)")
    add.add_argument("--scope")
    add.add_argument("--refresh-token", metavar="-", help="'-' reads the refresh token from stdin")
    add.add_argument("--refresh-token-file", metavar="FILE", help="read the refresh token from FILE")
    add.add_argument("--token-uri", help="Google token endpoint")
    add.add_argument("--token-url", help="OAuth2 token endpoint (provider oauth2)")
    add.add_argument("--service-account-file", metavar="FILE", help="the service account's JSON key")
    add.add_argument("--subject", help="the mailbox a service account impersonates")
    add.add_argument("--password", metavar="-", help="'-' reads the password from stdin")
    add.add_argument("--password-file", metavar="FILE", help="read the password from FILE")
    add.add_argument(
        "--allowed-caller",
        action="append",
        metavar="ROLE_ARN|ID|ACCOUNT",
        help="an IAM principal that may send through and take tokens of this integration "
        "(repeatable); a role ARN is looked up (IAM GetRole) and its unique id added, which is how "
        "the queue knows a sender",
    )
    add.add_argument("--replace", action="store_true", help="overwrite an existing integration")
    add.set_defaults(handler=add_integration)

    listing = sub.add_parser("list", parents=[common], help="every integration, with its last health")
    listing.set_defaults(handler=list_integrations)

    show = sub.add_parser("show", parents=[common], help="one integration, secrets redacted")
    show.add_argument("id")
    show.set_defaults(handler=show_integration)

    remove = sub.add_parser("remove", parents=[common], help="delete an integration's secret")
    remove.add_argument("id")
    remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    remove.set_defaults(handler=remove_integration)


# --- add -------------------------------------------------------------------------------------------


def add_integration(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    data = build_document(args)
    if args.allowed_caller:
        data["allowed_callers"] = resolve_callers(args.allowed_caller, ctx.client("iam"))
    try:
        integration = parse_integration(data)
    except InvalidIntegration as exc:
        return report_invalid(exc, out, from_flags=not args.from_file)
    store = ctx.integrations
    if not args.replace and integration.id in store.list_ids():
        raise CliError(
            f"integration {integration.id!r} already exists",
            hint="Pass --replace to overwrite it, or 'mailbroker integration remove' it first.",
            code="already_exists",
        )
    store.put(integration)
    if out.as_json:
        out.json({"id": integration.id, "written": store.secret_name(integration.id)})
    else:
        out.line(
            f"{out.mark(True)} integration {integration.id} ({integration.provider}) written to "
            f"secret {store.secret_name(integration.id)}"
        )
        if integration.provider == "microsoft" and integration.transport == "graph":
            out.note(
                f"next: mailbroker setup microsoft {integration.id} --transport graph   "
                "(Mail.Send and the application access policy)"
            )
        elif integration.provider == "microsoft":
            out.note(f"next: mailbroker setup microsoft {integration.id}   (Exchange Online permissions)")
        out.note(f"check it: mailbroker doctor {integration.id}")
    return 0


def build_document(args: argparse.Namespace, stdin: Any = None) -> dict[str, Any]:
    """The integration's JSON from --from-file, overridden by the flags given."""
    data: dict[str, Any] = {}
    if args.from_file:
        data = read_json(args.from_file, stdin)
        if not isinstance(data, dict):
            raise CliError(f"{args.from_file} does not hold a JSON object")
    if args.id:
        data["id"] = args.id
    if not data.get("id"):
        raise CliError("no integration id: give it as the first argument or in the file's 'id'")
    provider = args.provider or data.get("provider")
    if not provider:
        raise CliError("no provider: pass --provider " + "|".join(PROVIDERS))
    data["provider"] = provider
    simple = (
        "username", "tenant_id", "client_id", "client_secret_expires_at", "authority", "scope",
        "token_uri", "token_url", "subject", "transport", "graph_endpoint", "gmail_endpoint",
    )  # fmt: skip
    data.update({name: value for name in simple if (value := getattr(args, name, None)) is not None})
    _merge(data, "smtp", _smtp_flags(args, data, provider))
    if args.sender:
        data["senders"] = [parse_sender(s) for s in args.sender]
    if args.usage:
        data["usage"] = args.usage
    limits = {"messages_per_minute": args.messages_per_minute, "max_connections": args.max_connections}
    _merge(data, "limits", {name: value for name, value in limits.items() if value})
    if args.smtp_check:
        data["smtp_check"] = True
    if args.service_account_file:
        data["service_account_info"] = read_json(args.service_account_file, stdin)
        data.setdefault("subject", data.get("username"))
    _add_secrets(data, args, provider, stdin)
    return data


def _smtp_flags(args: argparse.Namespace, data: Mapping[str, object], provider: str) -> dict[str, object]:
    """--smtp-host, --smtp-port and --security as given, and the provider's host when none is."""
    flags = {"host": args.smtp_host, "port": args.smtp_port, "security": args.security}
    smtp = {name: value for name, value in flags.items() if value}
    if "host" not in smtp and not _has_host(data.get("smtp")) and provider in DEFAULT_SMTP:
        smtp["host"] = DEFAULT_SMTP[provider]
    return smtp


def _has_host(smtp: object) -> bool:
    return isinstance(smtp, dict) and "host" in smtp


def _merge(data: dict[str, object], name: str, values: Mapping[str, object]) -> None:
    """``values`` over the file's object ``name``, which is kept when no flag changes it (and kept
    as it is when it is not an object, for validation to name)."""
    given = data.get(name)
    if given is not None and not isinstance(given, dict):
        return
    merged = {**(given or {}), **values}
    if merged:
        data[name] = merged


def _add_secrets(
    data: dict[str, object], args: argparse.Namespace, provider: str, stdin: TextIO | None
) -> None:
    """Secrets from their flags ('-' reads one line from stdin), else asked for on a terminal."""
    for name in SECRET_FLAGS:
        value = secret_from_flags(args, name, stdin)
        if value is not None:
            data[name] = value
    for name in REQUIRED_SECRETS.get(provider, ()):
        if not data.get(name) and sys.stdin.isatty():
            data[name] = getpass.getpass(f"{SECRET_FLAGS[name]} for {data['id']}: ")


_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/(?:[\w+=,.@-]+/)*([\w+=,.@-]+)")


def resolve_callers(entries: list[str], iam: Any) -> list[str]:
    """The entries, each role ARN followed by its role's unique id (``AROA…``): SQS names a
    message's sender by that id only. Ids and account ids are kept as given."""
    resolved: list[str] = []
    for entry in entries:
        resolved.append(entry)
        match = _ROLE_ARN.fullmatch(entry)
        if not match:
            continue
        try:
            role = iam.get_role(RoleName=match.group(1))["Role"]
        except iam.exceptions.NoSuchEntityException:
            raise CliError(
                f"no IAM role {match.group(1)!r} in this account", hint="Check the role ARN."
            ) from None
        if role["Arn"] != entry:
            raise CliError(f"the role {match.group(1)!r} has the ARN {role['Arn']}, not {entry}")
        resolved.append(role["RoleId"])
    return list(dict.fromkeys(resolved))


def secret_from_flags(args: argparse.Namespace, name: str, stdin: Any = None) -> str | None:
    """The secret ``name`` from stdin (``--flag -``) or a file (``--flag-file FILE``); a value
    typed on the command line itself is refused, never stored."""
    flag = "--" + name.replace("_", "-")
    given, path = getattr(args, name, None), getattr(args, f"{name}_file", None)
    if given is not None and given != "-":
        raise CliError(
            f"{flag} takes '-' (read from stdin), not the secret itself: a secret on the command "
            "line is visible to other users in the process list and stays in shell history",
            hint=f"Use {flag} - (stdin), {flag}-file FILE, or leave it out to be asked on a terminal.",
        )
    if given is not None and path is not None:
        raise CliError(f"give {flag} - or {flag}-file, not both")
    if given == "-":
        return str((stdin or sys.stdin).readline()).rstrip("\r\n")
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from None
    return None


def parse_sender(text: str) -> dict[str, str]:
    email, _, name = text.partition("=")
    return {"email": email.strip(), **({"name": name.strip()} if name.strip() else {})}


def apply_mailbox_flags(document: dict[str, Any], args: argparse.Namespace) -> None:
    """A consent command's ``--sender`` and SMTP flags (``--smtp-host``, ``--smtp-port``,
    ``--security``), over what ``document`` holds."""
    if args.sender:
        document["senders"] = [parse_sender(s) for s in args.sender]
    smtp = dict(document.get("smtp") or {})
    for flag, key in (("smtp_host", "host"), ("smtp_port", "port"), ("security", "security")):
        if getattr(args, flag):
            smtp[key] = getattr(args, flag)
    document["smtp"] = smtp


def require_for_new(
    document: dict[str, Any], integration_id: str, fields: tuple[str, ...], hint: str
) -> None:
    """Refuses, naming the flags, when a consent command creating ``integration_id`` lacks any
    of ``fields``."""
    missing = [f"--{k.replace('_', '-')}" for k in fields if not document.get(k)]
    if missing:
        missing_flags = ", ".join(missing)
        raise CliError(
            f"integration {integration_id!r} does not exist yet and {missing_flags} is missing", hint=hint
        )


def read_json(path: str, stdin: Any = None) -> Any:
    try:
        raw = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def report_invalid(exc: InvalidIntegration, out: Output, *, from_flags: bool) -> int:
    problems = []
    for detail in exc.details:
        head, _, rest = detail["field"].partition(".")
        field = rest if head in PROVIDERS and rest else detail["field"]
        flag = FIELD_FLAGS.get(field) if from_flags else None
        problems.append({"field": field, "problem": detail["problem"], **({"flag": flag} if flag else {})})
    if out.as_json:
        out.json({"error": {"code": exc.code, "message": "the integration is invalid", "details": problems}})
        return 2
    out.note(f"{out.mark(False)} the integration is invalid; nothing was written:")
    for problem in problems:
        where = f"{problem['field']} ({problem['flag']})" if problem.get("flag") else problem["field"]
        out.note(f"  - {where}: {problem['problem']}")
    return 2


# --- list / show / remove ------------------------------------------------------------------------


def list_integrations(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    store = ctx.integrations
    rows = []
    health_store = ctx.health if ctx.settings.token_table else None
    for integration_id in store.list_ids():
        try:
            integration = store.get(integration_id)
            row: dict[str, Any] = {
                "id": integration_id,
                "provider": integration.provider,
                "transport": integration.transport,
                "username": integration.username,
                "smtp": f"{integration.smtp.host}:{integration.smtp.port}",
                "endpoint": _endpoint(integration),
                "valid": True,
            }
        except InvalidIntegration as exc:
            row = {"id": integration_id, "provider": None, "transport": None, "username": None}
            row.update(smtp=None, endpoint=None)
            row.update(valid=False, problem=exc.message)
        record = health_store.get(integration_id) if health_store else None
        row["healthy"] = record.healthy if record else None
        row["checked_at"] = record.checked_at if record else None
        row["last_error"] = record.last_error.code if record and record.last_error else None
        rows.append(row)
    if out.as_json:
        out.json([{**r, "checked_at": _iso(r["checked_at"])} for r in rows])
        return 0
    if not rows:
        out.note("no integrations yet: mailbroker integration add ID --provider ...")
        return 0
    out.table(
        ["ID", "PROVIDER", "TRANSPORT", "USERNAME", "ENDPOINT", "HEALTH", "CHECKED", "LAST ERROR"],
        [
            [
                r["id"],
                r["provider"] or out.paint("invalid", "red"),
                r["transport"],
                r["username"],
                r["endpoint"],
                _health_word(out, r["healthy"]),
                ago(r["checked_at"]),
                r["last_error"],
            ]
            for r in rows
        ],
    )
    return 0


def _endpoint(integration: Any) -> str:
    """Where the integration's mail goes: the SMTP server, or the HTTP transport's API."""
    if integration.transport == "smtp":
        return f"{integration.smtp.host}:{integration.smtp.port}"
    return str(integration.api_endpoint)


def _health_word(out: Output, healthy: bool | None) -> str:
    if healthy is None:
        return out.paint("unknown", "dim")
    return out.paint("healthy", "green") if healthy else out.paint("unhealthy", "red")


def _iso(moment: float | None) -> str | None:
    from mailbroker.health import iso

    return iso(moment)


def show_integration(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    integration = ctx.integrations.get(args.id)
    shown = integration.redacted()
    if out.as_json:
        out.json(shown)
        return 0
    for key, value in _flatten(shown):
        out.line(f"{out.paint(key, 'bold')}: {value}")
    return 0


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        pairs: list[tuple[str, str]] = []
        for key, item in value.items():
            if item is None:
                continue
            pairs.extend(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return pairs
    if isinstance(value, list):
        return [(prefix, ", ".join(_item(v) for v in value) or "-")]
    return [(prefix, str(value))]


def _item(value: Any) -> str:
    if isinstance(value, dict) and "email" in value:
        return f"{value['name']} <{value['email']}>" if value.get("name") else str(value["email"])
    return json.dumps(value) if isinstance(value, dict) else str(value)


def remove_integration(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    store = ctx.integrations
    if args.id not in store.list_ids():
        raise UnknownIntegration(f"no integration {args.id!r}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("refusing to delete without confirmation", hint="Pass --yes.")
        answer = input(f"Delete integration {args.id} (secret {store.secret_name(args.id)})? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            out.note("nothing deleted")
            return 1
    store.delete(args.id)
    if out.as_json:
        out.json({"id": args.id, "deleted": True})
    else:
        out.line(f"{out.mark(True)} integration {args.id} deleted")
    return 0
