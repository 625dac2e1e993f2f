"""``mailbroker setup microsoft ID [--transport smtp|graph]``: the admin-consent URL and the Exchange
Online PowerShell that let an Entra app send as a mailbox, with the integration's values filled
in: over SMTP (SMTP.SendAsApp, the Exchange service principal, mailbox permissions) or over
Microsoft Graph (Mail.Send, and an application access policy that scopes the app to the
integration's mailboxes)."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlencode

from mailbroker.integrations import MicrosoftIntegration

from mailbroker_cli.context import CliError, Context
from mailbroker_cli.output import Output

OBJECT_ID_PLACEHOLDER = "<Enterprise Application object id>"
# What the app needs for SMTP: Exchange Online's SMTP.SendAsApp, consented as this resource's .default.
EXCHANGE_DEFAULT_SCOPE = "https://outlook.office365.com/.default"
DEFAULT_REDIRECT_URI = "http://localhost"


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("setup", help="print the provider-side set-up for an integration")
    sub = group.add_subparsers(dest="provider", required=True, metavar="{microsoft}")
    microsoft = sub.add_parser(
        "microsoft",
        parents=[common],
        help="admin consent URL and Exchange Online PowerShell",
        description="Print the admin-consent URL and the exact Exchange Online PowerShell that let the "
        "integration's app send as its mailbox over SMTP.",
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
    microsoft.set_defaults(handler=setup_microsoft)


def setup_microsoft(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    integration = ctx.integrations.get(args.id)
    if not isinstance(integration, MicrosoftIntegration):
        raise CliError(f"integration {args.id!r} is a {integration.provider} integration, not microsoft")
    if (args.transport or integration.transport) == "graph":
        return _print_graph(graph_plan(integration, args.object_id), out)
    plan = microsoft_plan(integration, args.object_id, args.redirect_uri)
    if out.as_json:
        out.json(plan)
        return 0
    out.line(out.paint("1. Grant admin consent", "bold") + " (a Global or Privileged Role Administrator):")
    out.line(f"   {plan['admin_consent_url']}")
    out.line(f"   The browser then lands on {args.redirect_uri}?admin_consent=True&tenant=… (it must be a")
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
    out.line(f"4. Check it end to end: mailbroker doctor {integration.id}")
    return 0


def admin_consent_url(integration: MicrosoftIntegration, redirect_uri: str = DEFAULT_REDIRECT_URI) -> str:
    """The Microsoft identity platform v2.0 admin-consent URL for the Exchange Online scope."""
    query = urlencode(
        {"client_id": integration.client_id, "scope": EXCHANGE_DEFAULT_SCOPE, "redirect_uri": redirect_uri},
        safe=":/",
    )
    return f"{integration.authority}/{integration.tenant_id}/v2.0/adminconsent?{query}"


def microsoft_plan(
    integration: MicrosoftIntegration, object_id: str | None, redirect_uri: str = DEFAULT_REDIRECT_URI
) -> dict[str, Any]:
    principal = object_id or OBJECT_ID_PLACEHOLDER
    quoted = f'"{principal}"' if object_id else principal
    mailbox = integration.username
    send_as = sorted({s.email for s in integration.senders} | {mailbox}, key=str.lower)
    commands = [
        "Install-Module -Name ExchangeOnlineManagement -Scope CurrentUser   # once",
        f'Connect-ExchangeOnline -Organization "{integration.tenant_id}"',
        f'New-ServicePrincipal -AppId "{integration.client_id}" -ObjectId {quoted} '
        f'-DisplayName "mailbroker {integration.id}"',
        f'Add-MailboxPermission -Identity "{mailbox}" -User {quoted} -AccessRights FullAccess',
    ]
    commands += [
        f'Add-RecipientPermission -Identity "{address}" -Trustee {quoted} -AccessRights SendAs '
        "-Confirm:$false"
        for address in send_as
    ]
    commands.append(f'Set-CASMailbox -Identity "{mailbox}" -SmtpClientAuthenticationDisabled $false')
    return {
        "integration": integration.id,
        "admin_consent_url": admin_consent_url(integration, redirect_uri),
        "permission": "Office 365 Exchange Online / SMTP.SendAsApp (application)",
        "object_id": object_id,
        "powershell": commands,
        "verify": f"Get-ServicePrincipal -Identity {quoted} | Format-List DisplayName,AppId,ObjectId",
        "unused_permission": "Microsoft Graph / User.Read (delegated) is not used and can be removed",
    }


def graph_plan(integration: MicrosoftIntegration, object_id: str | None) -> dict[str, Any]:
    """What to grant for the graph transport: Mail.Send (application) with admin consent, and the
    Exchange Online cmdlets that limit the app to the integration's mailboxes."""
    mailbox = integration.username
    group = f"mailbroker-{integration.id}"
    others = sorted({s.email for s in integration.senders} - {mailbox}, key=str.lower)
    query = urlencode({"client_id": integration.client_id})
    commands = [
        "Install-Module -Name ExchangeOnlineManagement -Scope CurrentUser   # once",
        f'Connect-ExchangeOnline -Organization "{integration.tenant_id}"',
        f'New-DistributionGroup -Name "{group}" -Type Security -Members "{mailbox}"',
        f'New-ApplicationAccessPolicy -AppId "{integration.client_id}" -PolicyScopeGroupId "{group}" '
        f'-AccessRight RestrictAccess -Description "mailbroker {integration.id} sends only as {mailbox}"',
        f'Test-ApplicationAccessPolicy -Identity "{mailbox}" -AppId "{integration.client_id}"   '
        "# AccessCheckResult: Granted",
    ]
    commands += [
        f'Add-RecipientPermission -Identity "{address}" -Trustee "{mailbox}" -AccessRights SendAs '
        "-Confirm:$false"
        for address in others
    ]
    principal = f'"{object_id}"' if object_id else OBJECT_ID_PLACEHOLDER
    scope = f"mailbroker-{integration.id}"
    rbac = [
        f'New-ServicePrincipal -AppId "{integration.client_id}" -ObjectId {principal} '
        f'-DisplayName "mailbroker {integration.id}"',
        f'New-ManagementScope -Name "{scope}" -RecipientRestrictionFilter "PrimarySmtpAddress -eq '
        f"'{mailbox}'\"",
        f'New-ManagementRoleAssignment -App "{integration.client_id}" -Role "Application Mail.Send" '
        f'-CustomResourceScope "{scope}"',
        f'Test-ServicePrincipalAuthorization -Identity "{integration.client_id}" -Resource "{mailbox}"',
    ]
    return {
        "integration": integration.id,
        "transport": "graph",
        "admin_consent_url": f"{integration.authority}/{integration.tenant_id}/adminconsent?{query}",
        "permission": "Microsoft Graph / Mail.Send (application)",
        "object_id": object_id,
        "powershell": commands,
        "rbac_for_applications": rbac,
    }


def _print_graph(plan: dict[str, Any], out: Output) -> int:
    if out.as_json:
        out.json(plan)
        return 0
    out.line(
        out.paint("1. Grant Mail.Send and admin consent", "bold")
        + " (a Global or Privileged Role Administrator):"
    )
    out.line("   App registration > API permissions > Add a permission > Microsoft Graph > Application")
    out.line("   permissions > Mail.Send, then grant admin consent here:")
    out.line(f"   {plan['admin_consent_url']}")
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
    return 0
