"""``mailbroker setup microsoft --federated`` and ``setup google --workload-identity`` print exactly what
the provider must trust: this account's issuer and the functions' role ARNs, filled in."""

from __future__ import annotations

from mailbroker.integrations import parse_integration

from tests.integration.test_cli import cli  # noqa: F401 (the fixture)

ISSUER = "https://a1d2b0fd-1177-4468-9351-2fexample723.tokens.sts.global.api.aws"
ROLES = ["arn:aws:iam::123456789012:role/mb-TokenBrokerRole", "arn:aws:iam::123456789012:role/mb-SenderRole"]
PROVIDER = (
    "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/mailbroker/providers/aws"
)
ACCOUNT = "mailer@project.iam.gserviceaccount.com"


def put(cli, data):  # noqa: F811
    cli.store.put(parse_integration(data))


def keyless_microsoft(cli):  # noqa: F811
    put(
        cli,
        {
            "id": "m365-keyless",
            "provider": "microsoft",
            "smtp": {"host": "smtp.office365.com"},
            "username": "support@contoso.example",
            "tenant_id": "contoso.example",
            "client_id": "11111111-2222-3333-4444-555555555555",
            "federated": {},
        },
    )


def keyless_google(cli):  # noqa: F811
    put(
        cli,
        {
            "id": "gmail-keyless",
            "provider": "google_service_account",
            "smtp": {"host": "smtp.gmail.com"},
            "username": "support@contoso.example",
            "subject": "support@contoso.example",
            "workload_identity": {"audience": PROVIDER, "service_account": ACCOUNT},
        },
    )


def test_setup_microsoft_federated_prints_one_credential_per_role_with_the_graph_call(cli):  # noqa: F811
    keyless_microsoft(cli)
    roles = [arg for role in ROLES for arg in ("--role", role)]

    code, out, _ = cli("setup", "microsoft", "m365-keyless", "--federated", "--issuer", ISSUER, *roles)

    assert code == 0
    uri = "https://graph.microsoft.com/v1.0/applications(appId='11111111-2222-3333-4444-555555555555')/federatedIdentityCredentials"
    assert out.count(f'az rest --method POST --uri "{uri}"') == 2
    for role in ROLES:
        assert f"Subject:  {role}" in out
    assert f"Issuer:   {ISSUER}" in out and "Audience: api://AzureADTokenExchange" in out
    assert "New-ServicePrincipal" in out  # the Exchange steps still follow


def test_setup_microsoft_federated_as_json_holds_the_credentials_to_create(cli):  # noqa: F811
    keyless_microsoft(cli)

    code, plan = cli.json(
        "setup", "microsoft", "m365-keyless", "--federated", "--issuer", ISSUER, "--role", ROLES[0]
    )

    assert code == 0
    [credential] = plan["federated"]["federated_identity_credentials"]
    assert credential["issuer"] == ISSUER and credential["subject"] == ROLES[0]
    assert credential["audiences"] == ["api://AzureADTokenExchange"]


def test_setup_without_an_issuer_says_how_to_enable_outbound_federation(cli):  # noqa: F811
    keyless_microsoft(cli)

    code, out, err = cli("setup", "microsoft", "m365-keyless", "--federated", "--role", ROLES[0])

    assert code == 2
    assert "aws iam enable-outbound-web-identity-federation" in out + err


def test_setup_google_workload_identity_prints_pool_provider_bindings_and_delegation(cli):  # noqa: F811
    keyless_google(cli)
    roles = [arg for role in ROLES for arg in ("--role", role)]

    code, out, _ = cli("setup", "google", "gmail-keyless", "--workload-identity", "--issuer", ISSUER, *roles)

    assert code == 0
    assert "gcloud iam workload-identity-pools create mailbroker --location=global" in out
    assert (
        "gcloud iam workload-identity-pools providers create-oidc aws --location=global "
        f"--workload-identity-pool=mailbroker --issuer-uri={ISSUER} "
        "--attribute-mapping=google.subject=assertion.sub"
    ) in out
    assert f"'assertion.sub in ['\"'\"'{ROLES[0]}'\"'\"', " in out
    pool = "projects/123456/locations/global/workloadIdentityPools/mailbroker"
    for role in ROLES:
        assert f"--member=principal://iam.googleapis.com/{pool}/subject/{role}" in out
    assert f"--role=roles/iam.serviceAccountTokenCreator --member=serviceAccount:{ACCOUNT}" in out
    assert "value(uniqueId)" in out and "https://mail.google.com/" in out
    assert f"KeylessAudiences=https:{PROVIDER}" in out


def test_setup_google_refuses_an_integration_with_a_key(cli):  # noqa: F811
    put(
        cli,
        {
            "id": "gmail-keyed",
            "provider": "google_service_account",
            "smtp": {"host": "smtp.gmail.com"},
            "username": "support@contoso.example",
            "subject": "support@contoso.example",
            "service_account_info": cli.tokens.register_service_account(),
        },
    )

    code, out, err = cli(
        "setup", "google", "gmail-keyed", "--workload-identity", "--issuer", ISSUER, "--role", ROLES[0]
    )

    assert code == 2
    assert "workload_identity" in out + err
    assert "gcloud" not in out  # no plan for a keyed integration


def keyless_in_sandbox(cli, web_identity, integration_id, *, fic=True):  # noqa: F811
    """A keyless Microsoft integration whose app (in the sandbox Entra) trusts the sandbox issuer."""
    from mailbroker_sandbox.web_identity import SANDBOX_ROLE

    tenant, app = f"t-{integration_id}", f"app-{integration_id}"
    cli.tokens.register_microsoft_app(tenant, app)
    if fic:
        cli.tokens.add_microsoft_federated_credential(
            tenant, app, issuer=web_identity.issuer, subject=SANDBOX_ROLE
        )
    mailbox = f"{integration_id}@contoso.example"
    cli.smtp.add_mailbox(mailbox, allowed_clients=[app])
    put(
        cli,
        {
            "id": integration_id,
            "provider": "microsoft",
            "smtp": {"host": "127.0.0.1", "port": cli.smtp.port, "timeout_seconds": 5},
            "username": mailbox,
            "tenant_id": tenant,
            "client_id": app,
            "federated": {},
            "authority": cli.tokens.microsoft_authority(),
        },
    )


def test_doctor_walks_the_keyless_links_in_order(web_identity, cli):  # noqa: F811
    keyless_in_sandbox(cli, web_identity, "doctor-keyless")

    code, report = cli.json("doctor", "doctor-keyless")

    names = [step["name"] for step in report["steps"]]
    assert code == 0, report
    assert names.index("web identity") < names.index("token") < names.index("auth")
    minted = next(s for s in report["steps"] if s["name"] == "web identity")
    assert web_identity.issuer in minted["detail"] and "api://AzureADTokenExchange" in minted["detail"]


def test_doctor_stops_at_the_first_broken_keyless_link_with_its_fix(web_identity, cli):  # noqa: F811
    keyless_in_sandbox(cli, web_identity, "doctor-off")
    web_identity.enabled = False

    code, report = cli.json("doctor", "doctor-off")

    steps = {step["name"]: step for step in report["steps"]}
    assert code == 1
    assert steps["web identity"]["code"] == "federation_disabled"
    assert "enable-outbound-web-identity-federation" in steps["web identity"]["hint"]
    assert steps["token"]["ok"] is None and steps["auth"]["ok"] is None


def test_doctor_names_a_missing_federated_credential_at_the_token_step(web_identity, cli):  # noqa: F811
    keyless_in_sandbox(cli, web_identity, "doctor-nofic", fic=False)

    code, report = cli.json("doctor", "doctor-nofic")

    steps = {step["name"]: step for step in report["steps"]}
    assert code == 1
    assert steps["web identity"]["ok"] is True
    assert steps["token"]["code"] == "token_federation_mismatch" and "AADSTS70021" in steps["token"]["detail"]
