"""Keyless Google: the function role's AWS web identity token is exchanged at the sandbox's Google
STS through a workload identity pool provider, the service account is impersonated, signs the
domain-wide delegation assertion through the IAM Credentials signJwt stand-in, and the sandbox
token endpoint redeems it for the mailbox. No key exists anywhere."""

from __future__ import annotations

import json
import logging

import pytest
from mailbroker.integrations import parse_integration

from mailbroker_sandbox.google_federation import GoogleFederation
from mailbroker_sandbox.web_identity import SANDBOX_ROLE
from tests.fixtures.events import context

PROVIDER = (
    "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/mailbroker/providers/aws"
)
MAILBOX = "support@contoso.com"


@pytest.fixture(scope="module")
def google_federation(sandbox_ca, token_server_session):
    with GoogleFederation(sandbox_ca, token_server_session) as federation:
        yield federation


@pytest.fixture
def pipeline(web_identity, mail_pipeline, google_federation):
    google_federation.reset_counts()
    return mail_pipeline


def keyless(
    pipeline,
    web_identity,
    google,
    name,
    *,
    subjects=None,
    audiences=(),
    users=None,
    delegated=None,
    sign=True,
    provider=PROVIDER,
    register=True,
):
    integration_id = f"{name}-{pipeline.uid}"
    account = f"{name}-{pipeline.uid}@mailbroker-sandbox.iam.gserviceaccount.com"
    if register:
        registered = google.register_provider(
            PROVIDER, web_identity.issuer, allowed_subjects=subjects, allowed_audiences=audiences
        )
        principal = GoogleFederation.principal(registered, SANDBOX_ROLE)
        google.register_service_account(
            account,
            workload_users={principal} if users is None else users,
            delegated_subjects=delegated,
            sign_jwt_allowed=sign,
        )
    data = {
        "id": integration_id,
        "provider": "google_service_account",
        "smtp": {"host": "127.0.0.1", "port": pipeline.smtp.port, "timeout_seconds": 5},
        "username": MAILBOX,
        "senders": [{"email": MAILBOX}],
        "subject": MAILBOX,
        "token_uri": pipeline.tokens.google_token_uri,
        "workload_identity": {
            "audience": provider,
            "service_account": account,
            "sts_endpoint": google.sts_endpoint,
            "iamcredentials_endpoint": google.iamcredentials_endpoint,
        },
    }
    pipeline.integrations.put(parse_integration(data))
    pipeline.smtp.add_mailbox(MAILBOX)
    return integration_id


def token_answer(integration_id):
    from token_broker.app import lambda_handler

    return lambda_handler({"integration": integration_id}, context())


def test_keyless_google_delivers_with_no_key_in_integration_table_or_logs(
    pipeline, web_identity, google_federation, caplog, capsys
):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="mailbroker")
    integration_id = keyless(pipeline, web_identity, google_federation, "keyless-g")
    message = pipeline.message(integration_id)
    pipeline.post(message)

    failed = pipeline.run(pipeline.receive())

    assert failed == []
    assert pipeline.status(message["id"])["status"] == "sent"
    [minted] = web_identity.minted
    assert minted.audience == "https:" + PROVIDER and minted.subject == SANDBOX_ROLE
    assert google_federation.exchanges == 1 and google_federation.signed == 1
    secret = json.loads(
        pipeline.stack.client("secretsmanager").get_secret_value(
            SecretId=pipeline.integrations.secret_name(integration_id)
        )["SecretString"]
    )
    assert not {"service_account_info", "private_key", "client_secret", "refresh_token"} & set(secret)
    table = pipeline.stack.client("dynamodb").scan(TableName=pipeline.env["TOKEN_TABLE"])["Items"]
    said = caplog.text + capsys.readouterr().out + repr(table)
    assert minted.token not in said and minted.token.split(".")[2] not in said


def test_second_request_is_served_from_the_cache_without_another_exchange(
    pipeline, web_identity, google_federation
):
    integration_id = keyless(pipeline, web_identity, google_federation, "keyless-g-cache")

    first, second = token_answer(integration_id), token_answer(integration_id)

    assert first["source"] == "provider" and second["source"] in {"memory", "cache"}
    assert google_federation.exchanges == 1
    claims = pipeline.tokens.introspect(first["access_token"])
    assert claims["active"] and claims["sub"] == MAILBOX


@pytest.mark.parametrize(
    ("case", "code", "hint_says"),
    [
        ("attribute-condition", "token_federation_mismatch", "attribute condition"),
        ("audience", "token_federation_mismatch", "allowed audiences"),
        ("unknown-provider", "token_federation_mismatch", "workload_identity.audience"),
        ("not-workload-user", "token_impersonation_denied", "roles/iam.workloadIdentityUser"),
        ("sign-jwt-denied", "token_impersonation_denied", "serviceAccountTokenCreator"),
        ("no-delegation", "consent_required", "Domain Wide Delegation"),
    ],
)
def test_each_keyless_google_failure_is_classified(
    pipeline, web_identity, google_federation, case, code, hint_says
):
    options = {
        "attribute-condition": {"subjects": {"arn:aws:iam::123456789012:role/another"}},
        "audience": {"audiences": ("https://example.com/some-other-audience",)},
        "unknown-provider": {"provider": PROVIDER.replace("/providers/aws", "/providers/missing")},
        "not-workload-user": {"users": set()},
        "sign-jwt-denied": {"sign": False},
        "no-delegation": {"delegated": set()},
    }[case]
    integration_id = keyless(pipeline, web_identity, google_federation, f"kg-{case}", **options)

    answer = token_answer(integration_id)

    assert answer["error"]["code"] == code, answer
    assert hint_says in answer["error"]["hint"]
    if case == "sign-jwt-denied":
        assert "signJwt" in answer["error"]["message"]


def test_workload_identity_and_a_key_are_exclusive_and_the_audience_is_a_provider_name():
    from mailbroker.errors import InvalidIntegration

    base = {
        "id": "x",
        "provider": "google_service_account",
        "smtp": {"host": "smtp.gmail.com"},
        "username": MAILBOX,
        "subject": MAILBOX,
    }
    workload = {"audience": PROVIDER, "service_account": "sa@p.iam.gserviceaccount.com"}
    assert (
        parse_integration(base | {"workload_identity": workload}).service_account_email
        == workload["service_account"]
    )
    with pytest.raises(InvalidIntegration, match="exactly one"):
        parse_integration(base)
    with pytest.raises(InvalidIntegration, match="audience"):
        parse_integration(base | {"workload_identity": workload | {"audience": "projects/1/pools/x"}})


@pytest.mark.slow  # sixteen interpreters start: minutes on a loaded machine (pytest --long)
def test_sixteen_environments_make_one_exchange_per_lifetime(
    pipeline, web_identity, google_federation, monkeypatch
):
    from mailbroker import runtime

    from tests.integration.single_flight import PROCESSES, sixteen_environments

    lifetime, margin = 16.0, 6.0
    pipeline.tokens.lifetime = lifetime
    monkeypatch.setenv("TOKEN_REFRESH_MIN_MARGIN_SECONDS", str(margin))
    integration_id = keyless(pipeline, web_identity, google_federation, "kg-flight")
    integration = pipeline.integrations.get(integration_id)
    runtime.reset()

    sources, _ = sixteen_environments(integration, lifetime=lifetime, margin=margin)

    assert google_federation.exchanges == 2 and google_federation.signed == 2
    assert web_identity.count("https:" + PROVIDER) == 2
    assert sources.count("provider") == 2
    assert len(sources) == PROCESSES * 10
