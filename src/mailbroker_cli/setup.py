"""``mailbroker setup microsoft ID [--transport smtp|graph]``: the admin-consent URL and the Exchange
Online PowerShell that let an Entra app send as a mailbox, with the integration's values filled
in: over SMTP (SMTP.SendAsApp, the Exchange service principal, mailbox permissions) or over
Microsoft Graph (Mail.Send, and an application access policy that scopes the app to the
integration's mailboxes).

The values come from an integration secret, which someone other than the Exchange administrator
who pastes the commands may have written. So every value is checked for what it must be (an
address, a GUID, a domain name) before anything is printed, every value is emitted as a
single-quoted PowerShell string (no ``$`` expansion, no subexpressions; quote characters doubled),
and the consent URL is printed only for Microsoft's own sign-in hosts.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from mailbroker.diagnosis import microsoft_admin_consent_url
from mailbroker.integrations import MicrosoftIntegration
from mailbroker.messages.models import EmailAddress
from pydantic import ValidationError

from mailbroker_cli import setup_keyless
from mailbroker_cli.context import CliError, Context
from mailbroker_cli.output import Output

OBJECT_ID_PLACEHOLDER = "<Enterprise Application object id>"
# What the app needs for SMTP: Exchange Online's SMTP.SendAsApp, consented as this resource's .default.
EXCHANGE_DEFAULT_SCOPE = "https://outlook.office365.com/.default"
DEFAULT_REDIRECT_URI = "http://localhost"
_GUID = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}")
_DOMAIN = re.compile(r"(?=.{4,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}")
# PowerShell reads these four as single quotes too (its EscapeSingleQuotedStringContent doubles them).
_POWERSHELL_QUOTES = "'\u2018\u2019\u201a\u201b"
_NO_CONSENT_URL = (
    "   The integration's authority is not a Microsoft sign-in host, so no consent URL is",
    "   printed: grant consent in the Entra admin center (Enterprise applications > the app >",
    "   Permissions > Grant admin consent).",
)


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("setup", help="print the provider-side set-up for an integration")
    sub = group.add_subparsers(dest="provider", required=True, metavar="{microsoft,google}")
    microsoft = sub.add_parser(
        "microsoft",
        parents=[common],
        help="admin consent URL and Exchange Online PowerShell",
        description="Print the admin-consent URL and the exact Exchange Online PowerShell that let the "
        "integration's app send as its mailbox over SMTP. Every value is checked first (GUIDs, "
        "addresses) and printed single-quoted; the consent URL only on a Microsoft sign-in host.",
    )
    microsoft.add_argument("id")
    microsoft.add_argument(
        "--object-id",
        help="the service principal's object id: Entra admin center > Enterprise applications > the app "
        "> Overview > Object ID (not the App registration's object id)",
    )
    microsoft.add_argument(
        "--redirect-uri",
        default=DEFAULT_REDIRECT_URI,
        help="where Entra sends the browser after consent: a redirect URI registered on the app "
        f"(default {DEFAULT_REDIRECT_URI}; add it under Authentication > Mobile and desktop applications)",
    )
    microsoft.add_argument(
        "--transport",
        choices=("smtp", "graph"),
        help="the set-up for sending over SMTP or Microsoft Graph (default: the integration's transport)",
    )
    microsoft.add_argument(
        "--federated",
        action="store_true",
        help="keyless: also print the federated identity credentials that trust the functions' AWS roles",
    )
    setup_keyless.add_arguments(microsoft)
    microsoft.set_defaults(handler=setup_microsoft)
    google = sub.add_parser(
        "google",
        parents=[common],
        help="keyless: workload identity pool, provider, IAM bindings and domain-wide delegation",
        description="Print the Google Cloud workload identity federation and domain-wide delegation a "
        "keyless google_service_account integration needs, filled in with this stack's issuer and roles.",
    )
    google.add_argument("id")
    google.add_argument("--workload-identity", action="store_true", help="print the keyless set-up")
    setup_keyless.add_arguments(google)
    google.set_defaults(handler=setup_keyless.setup_google)


def setup_microsoft(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    integration = ctx.integrations.get(args.id)
    if not isinstance(integration, MicrosoftIntegration):
        raise CliError(f"integration {args.id!r} is a {integration.provider} integration, not microsoft")
    problems = plan_problems(integration, args.object_id)
    if problems:
        raise CliError(
            f"integration {integration.id!r} holds values that cannot go into the set-up commands: "
            + "; ".join(problems),
            hint="Fix the integration with 'mailbroker integration add --replace' (tenant and client "
            "ids are GUIDs from the app registration's Overview; the mailbox and senders are addresses).",
            code="invalid_integration",
        )
    if (args.transport or integration.transport) == "graph":
        plan = graph_plan(integration, args.object_id)
    else:
        plan = microsoft_plan(integration, args.object_id, args.redirect_uri)
    if getattr(args, "federated", False):
        issuer = setup_keyless.issuer_url(args, ctx)
        plan["federated"] = setup_keyless.microsoft_federated_plan(
            integration, issuer, setup_keyless.role_arns(args, ctx)
        )
    if out.as_json:
        out.json(plan)
        return 0
    if plan.get("federated"):
        setup_keyless.print_microsoft(plan["federated"], out)
    if plan.get("transport") == "graph":
        _print_graph(plan, out)
    else:
        _print_smtp(plan, args, out)
    return 0


def plan_problems(integration: MicrosoftIntegration, object_id: str | None) -> list[str]:
    """What in the integration (or the given object id) is not what the commands need."""
    problems = []
    if not (_GUID.fullmatch(integration.tenant_id) or _DOMAIN.fullmatch(integration.tenant_id)):
        problems.append("tenant_id must be the tenant's GUID or one of its verified domain names")
    if not _GUID.fullmatch(integration.client_id):
        problems.append("client_id must be the app registration's Application (client) ID, a GUID")
    if object_id is not None and not _GUID.fullmatch(object_id):
        problems.append("--object-id must be the Enterprise Application's object id, a GUID")
    for field, address in (("username", integration.username), *sender_fields(integration)):
        if not _is_address(address):
            problems.append(f"{field} must be an email address")
    return problems


def sender_fields(integration: MicrosoftIntegration) -> list[tuple[str, str]]:
    return [(f"senders[{index}].email", s.email) for index, s in enumerate(integration.senders)]


def _is_address(value: str) -> bool:
    try:
        return EmailAddress(email=value).email.lower() == value.lower()
    except ValidationError:
        return False


def powershell_string(value: str) -> str:
    """``value`` as a single-quoted PowerShell string: nothing inside is expanded or run."""
    return "'" + "".join(ch * 2 if ch in _POWERSHELL_QUOTES else ch for ch in value) + "'"


def admin_consent_url(
    integration: MicrosoftIntegration, redirect_uri: str = DEFAULT_REDIRECT_URI
) -> str | None:
    """The Microsoft identity platform v2.0 admin-consent URL for the Exchange Online scope, or
    None when the authority is not a Microsoft sign-in host (it would send the administrator to
    another site)."""
    return microsoft_admin_consent_url(
        integration.authority,
        integration.tenant_id,
        integration.client_id,
        scope=EXCHANGE_DEFAULT_SCOPE,
        redirect_uri=redirect_uri,
    )


def microsoft_plan(
    integration: MicrosoftIntegration, object_id: str | None, redirect_uri: str = DEFAULT_REDIRECT_URI
) -> dict[str, Any]:
    """The consent URL and the commands. Call :func:`plan_problems` first: the values must be valid."""
    q = powershell_string
    principal = q(object_id) if object_id else OBJECT_ID_PLACEHOLDER
    mailbox = integration.username
    send_as = sorted({s.email for s in integration.senders} | {mailbox}, key=str.lower)
    commands = [
        "Install-Module -Name ExchangeOnlineManagement -Scope CurrentUser   # once",
        f"Connect-ExchangeOnline -Organization {q(integration.tenant_id)}",
        f"New-ServicePrincipal -AppId {q(integration.client_id)} -ObjectId {principal} "
        f"-DisplayName {q('mailbroker ' + integration.id)}",
        f"Add-MailboxPermission -Identity {q(mailbox)} -User {principal} -AccessRights FullAccess",
    ]
    commands += [
        f"Add-RecipientPermission -Identity {q(address)} -Trustee {principal} -AccessRights SendAs "
        "-Confirm:$false"
        for address in send_as
    ]
    commands.append(f"Set-CASMailbox -Identity {q(mailbox)} -SmtpClientAuthenticationDisabled $false")
    return {
        "integration": integration.id,
        "admin_consent_url": admin_consent_url(integration, redirect_uri),
        "permission": "Office 365 Exchange Online / SMTP.SendAsApp (application)",
        "object_id": object_id,
        "powershell": commands,
        "verify": f"Get-ServicePrincipal -Identity {principal} | Format-List DisplayName,AppId,ObjectId",
        "unused_permission": "Microsoft Graph / User.Read (delegated) is not used and can be removed",
    }


def graph_plan(integration: MicrosoftIntegration, object_id: str | None) -> dict[str, Any]:
    """What to grant for the graph transport: Mail.Send (application) with admin consent, and the
    Exchange Online cmdlets that limit the app to the integration's mailboxes. Call
    :func:`plan_problems` first: the values must be valid."""
    q = powershell_string
    mailbox, app = integration.username, integration.client_id
    group = f"mailbroker-{integration.id}"
    description = f"mailbroker {integration.id} sends only as {mailbox}"
    others = sorted({s.email for s in integration.senders} - {mailbox}, key=str.lower)
    commands = [
        "Install-Module -Name ExchangeOnlineManagement -Scope CurrentUser   # once",
        f"Connect-ExchangeOnline -Organization {q(integration.tenant_id)}",
        f"New-DistributionGroup -Name {q(group)} -Type Security -Members {q(mailbox)}",
        f"New-ApplicationAccessPolicy -AppId {q(app)} -PolicyScopeGroupId {q(group)} "
        f"-AccessRight RestrictAccess -Description {q(description)}",
        f"Test-ApplicationAccessPolicy -Identity {q(mailbox)} -AppId {q(app)}   # AccessCheckResult: Granted",
    ]
    commands += [
        f"Add-RecipientPermission -Identity {q(address)} -Trustee {q(mailbox)} -AccessRights SendAs "
        "-Confirm:$false"
        for address in others
    ]
    principal = q(object_id) if object_id else OBJECT_ID_PLACEHOLDER
    # The filter is OPATH inside a PowerShell string: its own quotes are doubled first.
    opath_mailbox = mailbox.replace("'", "''")
    rbac = [
        f"New-ServicePrincipal -AppId {q(app)} -ObjectId {principal} "
        f"-DisplayName {q('mailbroker ' + integration.id)}",
        f"New-ManagementScope -Name {q(group)} "
        f"-RecipientRestrictionFilter {q(f'PrimarySmtpAddress -eq {chr(39)}{opath_mailbox}{chr(39)}')}",
        f"New-ManagementRoleAssignment -App {q(app)} -Role 'Application Mail.Send' "
        f"-CustomResourceScope {q(group)}",
        f"Test-ServicePrincipalAuthorization -Identity {q(app)} -Resource {q(mailbox)}",
    ]
    return {
        "integration": integration.id,
        "transport": "graph",
        "admin_consent_url": microsoft_admin_consent_url(integration.authority, integration.tenant_id, app),
        "permission": "Microsoft Graph / Mail.Send (application)",
        "object_id": object_id,
        "powershell": commands,
        "rbac_for_applications": rbac,
    }


def _print_consent_url(plan: dict[str, Any], out: Output) -> None:
    if plan["admin_consent_url"]:
        out.line(f"   {plan['admin_consent_url']}")
        return
    # Not even the authority is printed: a terminal would make a link of it.
    for line in _NO_CONSENT_URL:
        out.line(line)


def _print_smtp(plan: dict[str, Any], args: argparse.Namespace, out: Output) -> None:
    out.line(out.paint("1. Grant admin consent", "bold") + " (a Global or Privileged Role Administrator):")
    _print_consent_url(plan, out)
    if plan["admin_consent_url"]:
        out.line(
            f"   The browser then lands on {args.redirect_uri}?admin_consent=True&tenant=… (it must be a"
        )
        out.line("   redirect URI of the app; the consent is recorded even if that page does not load).")
    out.line("   The app registration needs the application permission Office 365 Exchange Online >")
    out.line("   SMTP.SendAsApp (API permissions > Add a permission > APIs my organization uses).")
    out.line("   The Microsoft Graph User.Read permission a new registration starts with is not used by")
    out.line("   mailbroker: you can remove it.")
    out.line()
    out.line(out.paint("2. Exchange Online PowerShell", "bold") + " (as an Exchange administrator):")
    if not args.object_id:
        out.line("   Find the object id first: Entra admin center > Enterprise applications > the app >")
        out.line("   Overview > Object ID. It is NOT the object id on the App registration's page; the")
        out.line("   wrong one makes every AUTH fail with 535 5.7.3.")
    out.line()
    for command in plan["powershell"]:
        out.line(f"   {command}")
    out.line()
    out.line(
        out.paint("3. Verify", "bold") + " that Exchange knows the app under the right ids (AppId is the"
    )
    out.line("   client id, ObjectId the Enterprise Application's object id):")
    out.line(f"   {plan['verify']}")
    out.line()
    out.line(f"4. Check it end to end: mailbroker doctor {plan['integration']}")


def _print_graph(plan: dict[str, Any], out: Output) -> None:
    out.line(
        out.paint("1. Grant Mail.Send and admin consent", "bold")
        + " (a Global or Privileged Role Administrator):"
    )
    out.line("   App registration > API permissions > Add a permission > Microsoft Graph > Application")
    out.line("   permissions > Mail.Send, then grant admin consent here:")
    _print_consent_url(plan, out)
    out.line("   (SMTP.SendAsApp is the SMTP permission: Graph does not accept it.)")
    out.line()
    out.line(
        out.paint("2. Limit the app to this integration's mailboxes", "bold")
        + " (Exchange Online PowerShell, as an Exchange administrator):"
    )
    out.line("   Without this, Mail.Send lets the app send as every mailbox in the tenant.")
    out.line()
    for command in plan["powershell"]:
        out.line(f"   {command}")
    out.line()
    out.line("   Or, with RBAC for Applications instead of Mail.Send in Entra ID and the policy above:")
    for command in plan["rbac_for_applications"]:
        out.line(f"   {command}")
    out.line()
    out.line(f"3. Check it (no mail is sent): mailbroker doctor {plan['integration']}")
