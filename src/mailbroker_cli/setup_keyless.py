"""``mailbroker setup microsoft ID --federated`` and ``mailbroker setup google ID --workload-identity``:
what the provider must trust so that the functions' own AWS identity is the credential.

Both need the account's outbound identity federation issuer URL and the ARNs of the roles that
mint tokens (token broker, sender, keeper). The issuer comes from ``--issuer``, else IAM
(``GetOutboundWebIdentityFederationInfo``), else the stack's ``KeylessIssuerUrl`` output; the
roles from ``--role`` (repeatable), else the stack's ``TokenBrokerRoleArn``, ``SenderRoleArn`` and
``KeeperRoleArn`` outputs. The steps follow the providers' documentation: Microsoft Graph
``POST /applications(appId='…')/federatedIdentityCredentials`` (name, issuer, subject, audiences;
at most 20 per app), and Google's ``gcloud iam workload-identity-pools`` and
``gcloud iam service-accounts add-iam-policy-binding`` (see docs/operations.md, "Keyless").
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from typing import Any

from mailbroker.integrations import GoogleServiceAccountIntegration, MicrosoftIntegration

from mailbroker_cli.context import CliError, Context
from mailbroker_cli.output import Output

ROLE_OUTPUTS = ("TokenBrokerRoleArn", "SenderRoleArn", "KeeperRoleArn")
GRAPH = "https://graph.microsoft.com/v1.0"
_PROVIDER_NAME = re.compile(
    r"^//iam\.googleapis\.com/projects/(?P<project>[^/]+)/locations/global/"
    r"workloadIdentityPools/(?P<pool>[^/]+)/providers/(?P<provider>[^/]+)$"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--issuer", help="the account's outbound identity federation issuer URL")
    parser.add_argument(
        "--role",
        action="append",
        default=[],
        metavar="ARN",
        help="a role whose tokens the provider trusts (repeatable; default: the stack's role outputs)",
    )


def _stack_outputs(ctx: Context) -> dict[str, str]:
    if not ctx.stack:
        return {}
    answer = ctx.client("cloudformation").describe_stacks(StackName=ctx.stack)
    return {o["OutputKey"]: o["OutputValue"] for o in answer["Stacks"][0].get("Outputs", [])}


def issuer_url(args: argparse.Namespace, ctx: Context) -> str:
    if args.issuer:
        return str(args.issuer).rstrip("/")
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    try:
        info = ctx.client("iam").get_outbound_web_identity_federation_info()
        if info.get("IssuerIdentifier") and info.get("JwtVendingEnabled", True):
            return str(info["IssuerIdentifier"]).rstrip("/")
    except (ClientError, BotoCoreError, ResponseParserError):
        pass  # not enabled (FeatureDisabled), not allowed, or an emulator without the call
    issuer = _stack_outputs(ctx).get("KeylessIssuerUrl")
    if issuer:
        return issuer.rstrip("/")
    raise CliError(
        "the account's outbound identity federation issuer URL is unknown",
        code="federation_disabled",
        hint="Enable it once per account: 'aws iam enable-outbound-web-identity-federation' (it prints "
        "IssuerIdentifier), then pass --issuer <that URL>, or deploy with KeylessIssuerUrl set.",
    )


def role_arns(args: argparse.Namespace, ctx: Context) -> list[str]:
    if args.role:
        return list(dict.fromkeys(args.role))
    outputs = _stack_outputs(ctx)
    roles = [outputs[name] for name in ROLE_OUTPUTS if outputs.get(name)]
    if not roles:
        raise CliError(
            "no role ARNs to trust",
            hint="Pass --stack <name> (its TokenBrokerRoleArn, SenderRoleArn and KeeperRoleArn outputs) or "
            "--role <arn> for each function role.",
        )
    return roles


# --- Microsoft -------------------------------------------------------------------------------------


def microsoft_federated_plan(
    integration: MicrosoftIntegration, issuer: str, roles: list[str]
) -> dict[str, Any]:
    audience = integration.federated.audience if integration.federated else "api://AzureADTokenExchange"
    credentials = [
        {
            "name": f"mailbroker-{integration.id}-{_role_name(role)}"[:120],
            "issuer": issuer,
            "subject": role,
            "audiences": [audience],
            "description": f"mailbroker {integration.id}: the {_role_name(role)} Lambda role "
            "(AWS outbound identity federation)",
        }
        for role in roles
    ]
    uri = f"{GRAPH}/applications(appId='{integration.client_id}')/federatedIdentityCredentials"
    return {
        "integration": integration.id,
        "client_id": integration.client_id,
        "issuer": issuer,
        "federated_identity_credentials": credentials,
        "graph": [f"POST {uri}" for _ in credentials],
        "az": [
            f'az rest --method POST --uri "{uri}" --body {shlex.quote(json.dumps(c))}' for c in credentials
        ],
    }


def print_microsoft(plan: dict[str, Any], out: Output) -> None:
    out.line(
        out.paint("0. Trust the functions' AWS identity", "bold") + " (keyless: no secret, no certificate)"
    )
    out.line(f"   App registrations > {plan['client_id']} > Certificates & secrets > Federated credentials >")
    out.line("   Add credential > Other issuer, once per role below; or run the Microsoft Graph calls:")
    for credential, command in zip(plan["federated_identity_credentials"], plan["az"], strict=True):
        out.line(f"   Issuer:   {credential['issuer']}")
        out.line(f"   Subject:  {credential['subject']}")
        out.line(f"   Audience: {credential['audiences'][0]}")
        out.line(f"   Name:     {credential['name']}")
        out.line(f"   {command}")
        out.line()


# --- Google ----------------------------------------------------------------------------------------


def google_workload_plan(
    integration: GoogleServiceAccountIntegration, issuer: str, roles: list[str]
) -> dict[str, Any]:
    workload = integration.workload_identity
    if workload is None:
        raise CliError(
            f"integration {integration.id!r} has no workload_identity",
            hint='Give it "workload_identity": {"audience": "//iam.googleapis.com/projects/<number>/'
            'locations/global/workloadIdentityPools/<pool>/providers/<provider>", '
            '"service_account": "<email>"} instead of service_account_info.',
        )
    parts = _PROVIDER_NAME.fullmatch(workload.audience)
    assert parts is not None  # the schema checked the shape
    project, pool, provider = parts["project"], parts["pool"], parts["provider"]
    account = workload.service_account
    pool_path = f"projects/{project}/locations/global/workloadIdentityPools/{pool}"
    condition = "assertion.sub in [" + ", ".join(f"'{role}'" for role in roles) + "]"
    commands = [
        "gcloud services enable sts.googleapis.com iamcredentials.googleapis.com",
        f"gcloud iam workload-identity-pools create {pool} --location=global --display-name=mailbroker",
        f"gcloud iam workload-identity-pools providers create-oidc {provider} --location=global "
        f"--workload-identity-pool={pool} --issuer-uri={shlex.quote(issuer)} "
        f"--attribute-mapping=google.subject=assertion.sub "
        f"--attribute-condition={shlex.quote(condition)}",
    ]
    commands += [
        f"gcloud iam service-accounts add-iam-policy-binding {account} --role=roles/iam.workloadIdentityUser "
        f"--member={shlex.quote(f'principal://iam.googleapis.com/{pool_path}/subject/{role}')}"
        for role in roles
    ]
    commands.append(
        f"gcloud iam service-accounts add-iam-policy-binding {account} "
        f"--role=roles/iam.serviceAccountTokenCreator --member=serviceAccount:{account}"
    )
    return {
        "integration": integration.id,
        "issuer": issuer,
        "provider": workload.audience,
        "token_audience": workload.token_audience,
        "service_account": account,
        "roles": roles,
        "gcloud": commands,
        "domain_wide_delegation": {
            "client_id_command": f"gcloud iam service-accounts describe {account} --format='value(uniqueId)'",
            "scopes": [integration.scope],
            "where": "Google Admin console > Security > Access and data control > API controls > "
            "Manage Domain Wide Delegation > Add new",
        },
        "keyless_audience": workload.token_audience,
    }


def print_google(plan: dict[str, Any], out: Output) -> None:
    out.line(out.paint("1. Google Cloud", "bold") + " (the pool, its OIDC provider and the IAM bindings):")
    for command in plan["gcloud"]:
        out.line(f"   {command}")
    out.line()
    dwd = plan["domain_wide_delegation"]
    out.line(out.paint("2. Domain-wide delegation", "bold") + f" ({dwd['where']}):")
    out.line(f"   Client ID: the service account's unique ID: {dwd['client_id_command']}")
    out.line(f"   OAuth scopes: {', '.join(dwd['scopes'])}")
    out.line()
    out.line(out.paint("3. The stack", "bold") + " may mint tokens for this provider:")
    out.line(f"   sam deploy --parameter-overrides KeylessAudiences={plan['keyless_audience']}")
    out.line()
    out.line(f"4. Check it: mailbroker doctor {plan['integration']}")


def setup_google(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    integration = ctx.integrations.get(args.id)
    if not isinstance(integration, GoogleServiceAccountIntegration):
        raise CliError(
            f"integration {args.id!r} is a {integration.provider} integration, not google_service_account"
        )
    if not args.workload_identity:
        raise CliError("say what to set up: --workload-identity", code="usage_error")
    plan = google_workload_plan(integration, issuer_url(args, ctx), role_arns(args, ctx))
    if out.as_json:
        out.json(plan)
    else:
        print_google(plan, out)
    return 0


def _role_name(arn: str) -> str:
    return arn.rsplit("/", 1)[-1] or arn
