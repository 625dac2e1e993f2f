"""Certificate credentials for Microsoft: MSAL signs a client assertion with the integration's key,
the sandbox's Entra stand-in verifies it against the certificate uploaded to the app, and every way
it can go wrong arrives classified."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from mailbroker import runtime
from mailbroker.integrations import IntegrationStore, parse_integration, unredacted

from mailbroker_cli.certificates import self_signed


@pytest.fixture
def broker_env(stack, aws_env, token_server, ca_trust_env, monkeypatch):
    for name, value in stack.function_env("TokenBrokerFunction").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKEN_HTTP_TIMEOUT_SECONDS", "2")
    runtime.reset()
    yield stack.function_env("TokenBrokerFunction")
    runtime.reset()


@pytest.fixture
def integrations(broker_env):
    return IntegrationStore(runtime.aws_client("secretsmanager"), broker_env["SECRET_PREFIX"], max_age=0)


def certificate_integration(token_server, integrations, id, *, key, cert, registered=None, send_x5c=False):
    token_server.register_microsoft_app("fabrikam", "app-" + id, certificates=registered or [cert])
    integration = parse_integration(
        {
            "id": id,
            "provider": "microsoft",
            "smtp": {"host": "127.0.0.1", "port": 2587},
            "username": "orders@fabrikam.example",
            "tenant_id": "fabrikam",
            "client_id": "app-" + id,
            "client_certificate": {"private_key": key, "certificate": cert, "send_x5c": send_x5c},
            "authority": token_server.base_url,
        }
    )
    integrations.put(integration)
    return integration


def test_certificate_credential_gets_a_token_through_a_verified_client_assertion(token_server, integrations):
    key, cert = self_signed("mailbroker cert-ok")
    certificate_integration(token_server, integrations, "cert-ok", key=key, cert=cert)

    token = runtime.token_broker().token_for("cert-ok")

    claims = token_server.introspect(token.access_token)
    assert token.source == "provider"
    assert claims["active"] and claims["client_id"] == "app-cert-ok"
    assert "SMTP.SendAsApp" in claims["roles"]
    assert jwt.decode(token.access_token, options={"verify_signature": False})["appidacr"] == "2"


def test_assertion_names_the_certificate_by_sha256_thumbprint_and_sends_x5c_only_when_asked():
    from mailbroker.tokens.credentials import CertificateAssertion, certificate_facts

    key, cert = self_signed("mailbroker headers")
    plain = CertificateAssertion(key, cert, issuer="app-1")
    plain.audience = "https://login.example/t/oauth2/v2.0/token"
    chained = CertificateAssertion(key, cert, issuer="app-1", send_x5c=True)
    chained.audience = plain.audience

    header, with_chain = jwt.get_unverified_header(plain()), jwt.get_unverified_header(chained())
    claims = jwt.decode(plain(), options={"verify_signature": False})

    thumbprint = base64.urlsafe_b64encode(bytes.fromhex(certificate_facts(cert).thumbprint_sha256))
    assert header["x5t#S256"].rstrip("=") == thumbprint.rstrip(b"=").decode()
    assert "x5c" not in header and "x5t" not in header
    assert with_chain["x5c"] and "BEGIN" not in with_chain["x5c"][0]
    assert claims["iss"] == claims["sub"] == "app-1"
    assert claims["aud"] == plain.audience
    assert plain() != plain()  # a new jti every time


def test_key_that_does_not_match_the_certificate_is_classified_before_any_request(token_server, integrations):
    key, cert = self_signed("mailbroker mismatch")
    other_key, _ = self_signed("mailbroker other")
    certificate_integration(token_server, integrations, "cert-mismatch", key=other_key, cert=cert)
    token_server.reset_counts()

    from token_broker.app import lambda_handler

    answer = lambda_handler({"integration": "cert-mismatch"}, _Context())

    assert answer["error"]["code"] == "token_certificate_mismatch"
    assert "cert create" in answer["error"]["hint"]
    assert token_server.requests == 0
    assert other_key not in json.dumps(answer) and key not in json.dumps(answer)


def test_certificate_entra_does_not_know_is_classified_as_unknown(token_server, integrations):
    key, cert = self_signed("mailbroker unknown")
    _, registered = self_signed("mailbroker registered")
    certificate_integration(
        token_server, integrations, "cert-unknown", key=key, cert=cert, registered=[registered]
    )

    from token_broker.app import lambda_handler

    answer = lambda_handler({"integration": "cert-unknown"}, _Context())

    assert answer["error"]["code"] == "token_certificate_unknown"
    assert "AADSTS700027" in answer["error"]["message"]
    assert "Certificates & secrets" in answer["error"]["hint"]


def test_expired_certificate_is_classified_as_expired(token_server, integrations):
    key, cert = self_signed("mailbroker expired", days=1)
    certificate_integration(token_server, integrations, "cert-expired", key=key, cert=cert)
    from mailbroker.tokens.credentials import CertificateAssertion

    assertion = CertificateAssertion(key, cert, issuer="x", clock=lambda: 4_000_000_000.0)
    from mailbroker.errors import TokenError

    with pytest.raises(TokenError) as caught:
        assertion()

    assert caught.value.code == "token_certificate_expired"


def test_entra_answer_for_an_expired_registered_key_is_classified_as_expired():
    from mailbroker.errors import classify_token_error

    error = classify_token_error(
        error="invalid_client",
        description="AADSTS700027: Client assertion failed signature validation. "
        "[Reason - The key used is expired.]",
        error_codes=[700027],
        provider="microsoft",
    )

    assert error.code == "token_certificate_expired"


def test_a_replayed_client_assertion_is_refused(token_server, integrations):
    import requests
    from mailbroker.tokens.credentials import CertificateAssertion

    key, cert = self_signed("mailbroker replay")
    certificate_integration(token_server, integrations, "cert-replay", key=key, cert=cert)
    assertion = CertificateAssertion(key, cert, issuer="app-cert-replay")
    assertion.audience = token_server.microsoft_token_url("fabrikam")
    signed = assertion()
    form = {
        "grant_type": "client_credentials",
        "client_id": "app-cert-replay",
        "scope": "https://outlook.office365.com/.default",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": signed,
    }

    first = requests.post(assertion.audience, data=form, timeout=5)
    second = requests.post(assertion.audience, data=form, timeout=5)

    assert first.status_code == 200
    assert second.status_code == 401 and second.json()["error"] == "invalid_client"


class _Context:
    function_name = "TokenBrokerFunction"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:TokenBrokerFunction"
    aws_request_id = "c0ffee00-0000-4000-8000-000000000002"


def test_a_message_is_delivered_with_a_certificate_credential(mail_pipeline):
    integration_id = mail_pipeline.add("microsoft", name="cert-mail")
    key, cert = self_signed("mailbroker cert-mail")
    client_id = mail_pipeline.client_id(integration_id)
    mail_pipeline.tokens.add_microsoft_certificate("contoso", client_id, cert)
    document = unredacted(mail_pipeline.integrations.get(integration_id))
    del document["client_secret"]
    document["client_certificate"] = {"private_key": key, "certificate": cert}
    mail_pipeline.integrations.put(parse_integration(document))
    message = mail_pipeline.message(integration_id)

    mail_pipeline.post(message)
    mail_pipeline.drive()
    outcome = mail_pipeline.outcome(message["id"])

    assert outcome.state == "sent" and outcome.deliveries == 1
    assert mail_pipeline.tokens.issued(client_id=client_id) == 1
