"""Keyless Microsoft: the client assertion is the function role's own JWT from STS
GetWebIdentityToken (the sandbox issuer), which the sandbox's Entra stand-in verifies against the
issuer's published keys and the app's federated identity credential. No secret or key exists
anywhere: not in the integration, not in the token table, not in the logs."""

from __future__ import annotations

import json
import logging

import jwt
import pytest
from mailbroker import runtime
from mailbroker.integrations import parse_integration

from mailbroker_sandbox.web_identity import SANDBOX_ROLE
from tests.fixtures.events import context

AUDIENCE = "api://AzureADTokenExchange"
TENANT = "contoso"


def keyless(pipeline, web_identity, name, *, issuer=None, subject=SANDBOX_ROLE, audience=AUDIENCE, fic=True):
    """A keyless Microsoft integration whose app trusts (or does not) the sandbox issuer."""
    integration_id = f"{name}-{pipeline.uid}"
    client_id = f"client-{integration_id}"
    pipeline.tokens.register_microsoft_app(TENANT, client_id)  # no secret, no certificate
    if fic:
        pipeline.tokens.add_microsoft_federated_credential(
            TENANT, client_id, issuer=issuer or web_identity.issuer, subject=subject, audience=audience
        )
    data = {
        "id": integration_id,
        "provider": "microsoft",
        "smtp": {"host": "127.0.0.1", "port": pipeline.smtp.port, "timeout_seconds": 5},
        "username": "support@contoso.com",
        "senders": [{"email": "support@contoso.com"}],
        "tenant_id": TENANT,
        "client_id": client_id,
        "federated": {"audience": AUDIENCE},
        "authority": pipeline.tokens.base_url,
    }
    pipeline.integrations.put(parse_integration(data))
    pipeline.smtp.add_mailbox("support@contoso.com")
    return integration_id


@pytest.fixture
def pipeline(web_identity, mail_pipeline):
    return mail_pipeline


def token_answer(integration_id):
    from token_broker.app import lambda_handler

    return lambda_handler({"integration": integration_id}, context())


def test_keyless_integration_delivers_with_no_secret_in_integration_table_or_logs(
    pipeline, web_identity, caplog, capsys
):
    caplog.set_level(logging.INFO)  # as deployed (LOG_LEVEL=INFO), and the package's own DEBUG too
    caplog.set_level(logging.DEBUG, logger="mailbroker")
    integration_id = keyless(pipeline, web_identity, "keyless-ms")
    message = pipeline.message(integration_id)
    pipeline.post(message)

    failed = pipeline.run(pipeline.receive())

    assert failed == []
    assert pipeline.status(message["id"])["status"] == "sent"
    # The provider saw the role's own JWT, minted for Entra's audience.
    [minted] = web_identity.minted
    assert minted.audience == AUDIENCE and minted.subject == SANDBOX_ROLE
    assert jwt.decode(minted.token, options={"verify_signature": False})["iss"] == web_identity.issuer
    # Nothing secret is stored or said.
    secret = json.loads(
        pipeline.stack.client("secretsmanager").get_secret_value(
            SecretId=pipeline.integrations.secret_name(integration_id)
        )["SecretString"]
    )
    assert not {"client_secret", "client_certificate", "private_key", "refresh_token"} & set(secret)
    table = pipeline.stack.client("dynamodb").scan(TableName=pipeline.env["TOKEN_TABLE"])["Items"]
    said = caplog.text + capsys.readouterr().out + repr(table)
    assert minted.token not in said
    assert minted.token.split(".")[2] not in said


def test_token_broker_mints_one_jwt_per_provider_exchange_and_serves_the_cache_after(pipeline, web_identity):
    integration_id = keyless(pipeline, web_identity, "keyless-cache")

    first = token_answer(integration_id)
    second = token_answer(integration_id)

    assert first["source"] == "provider" and second["source"] in {"memory", "cache"}
    assert web_identity.count(AUDIENCE) == 1
    claims = pipeline.tokens.introspect(first["access_token"])
    assert claims["active"] and claims["client_id"] == pipeline.client_id(integration_id)


def test_outbound_federation_not_enabled_is_classified_with_the_command_to_enable_it(pipeline, web_identity):
    integration_id = keyless(pipeline, web_identity, "keyless-off")
    web_identity.enabled = False
    pipeline.tokens.reset_counts()

    answer = token_answer(integration_id)

    assert answer["error"]["code"] == "federation_disabled"
    assert "aws iam enable-outbound-web-identity-federation" in answer["error"]["hint"]
    assert pipeline.tokens.requests == 0  # Entra was never asked


def test_role_not_allowed_the_audience_is_classified_as_not_permitted(pipeline, web_identity):
    integration_id = keyless(pipeline, web_identity, "keyless-denied")
    web_identity.allowed_audiences = {"https://iam.googleapis.com/projects/1/other"}

    answer = token_answer(integration_id)

    assert answer["error"]["code"] == "federation_not_permitted"
    assert "KeylessAudiences" in answer["error"]["hint"]


@pytest.mark.parametrize(
    ("case", "aadsts", "hint_says"),
    [
        ("no-fic", 70021, "Federated credentials"),
        ("issuer", 700211, "issuer"),
        ("audience", 700212, "audience"),
        ("subject", 700213, "ARN of the function's role"),
    ],
)
def test_federated_credential_mismatch_is_classified_by_what_differs(
    pipeline, web_identity, case, aadsts, hint_says
):
    options = {
        "no-fic": {"fic": False},
        "issuer": {"issuer": "https://another-account.tokens.sts.global.api.aws"},
        "audience": {"audience": "api://SomethingElse"},
        "subject": {"subject": "arn:aws:iam::123456789012:role/another-role"},
    }[case]
    integration_id = keyless(pipeline, web_identity, f"keyless-{case}", **options)

    answer = token_answer(integration_id)

    assert answer["error"]["code"] == "token_federation_mismatch"
    assert f"AADSTS{aadsts}" in answer["error"]["message"]
    assert hint_says in answer["error"]["hint"]


def test_a_token_signed_by_another_key_is_refused_even_with_matching_claims(pipeline, web_identity):
    from mailbroker_sandbox.web_identity import WebIdentityIssuer

    integration_id = keyless(pipeline, web_identity, "keyless-forged")
    impostor = WebIdentityIssuer(web_identity.ca)  # same claims, its own key, never served
    try:
        forged = impostor.mint(AUDIENCE, SANDBOX_ROLE)
        forged_claims = jwt.decode(forged, options={"verify_signature": False})
        forged_claims["iss"] = web_identity.issuer
        forged = jwt.encode(
            forged_claims, impostor._key, algorithm="RS256", headers={"kid": web_identity.jwk()["kid"]}
        )
        client = pipeline.client_id(integration_id)
        form = {
            "client_id": client,
            "grant_type": "client_credentials",
            "scope": "https://outlook.office365.com/.default",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": forged,
        }
        import requests

        answer = requests.post(
            pipeline.tokens.microsoft_token_url(TENANT),
            data=form,
            timeout=5,
            verify=str(web_identity.ca.ca_cert),
        )
    finally:
        impostor.stop()

    assert answer.status_code == 400
    assert answer.json()["error_codes"] == [50027]


def test_keyless_is_validated_as_the_only_client_credential():
    base = {
        "id": "x",
        "provider": "microsoft",
        "smtp": {"host": "smtp.office365.com"},
        "username": "a@contoso.com",
        "tenant_id": "t",
        "client_id": "c",
    }
    from mailbroker.errors import InvalidIntegration

    assert parse_integration(base | {"federated": {}}).federated.audience == AUDIENCE
    with pytest.raises(InvalidIntegration, match="one client credential"):
        parse_integration(base | {"federated": {}, "client_secret": "s3cret-value"})
    runtime.reset()


@pytest.mark.slow  # sixteen interpreters start: minutes on a loaded machine (pytest --long)
def test_sixteen_environments_make_one_provider_exchange_per_lifetime(pipeline, web_identity, monkeypatch):
    from tests.integration.single_flight import PROCESSES, sixteen_environments

    lifetime, margin = 16.0, 6.0
    pipeline.tokens.lifetime = lifetime
    monkeypatch.setenv("TOKEN_REFRESH_MIN_MARGIN_SECONDS", str(margin))
    integration_id = keyless(pipeline, web_identity, "keyless-flight")
    integration = pipeline.integrations.get(integration_id)
    runtime.reset()

    sources, _ = sixteen_environments(integration, lifetime=lifetime, margin=margin)

    client = pipeline.client_id(integration_id)
    assert pipeline.tokens.issued(client_id=client) == 2  # one per lifetime
    assert web_identity.count(AUDIENCE) == 2  # one JWT per provider exchange, none wasted
    assert sources.count("provider") == 2
    assert len(sources) == PROCESSES * 10
