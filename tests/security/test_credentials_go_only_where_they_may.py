"""A bearer token, secret or password goes only to a verified TLS peer (or a loopback peer in
clear), never towards link-local or instance-metadata addresses, and never to a server that has
not proved it holds the credential's identity. Real token endpoints and SMTP servers on loopback
stand in for the providers; a second CA no client trusts stands in for an impostor."""

from __future__ import annotations

import functools

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mailbroker import runtime
from mailbroker.errors import InvalidIntegration, SmtpFailure, TokenError
from mailbroker.integrations import IntegrationStore, parse_integration
from mailbroker.smtp.transport import SmtpSession
from mailbroker.smtp.xoauth2 import BasicAuth, XOAuth2Auth
from mailbroker.tokens.providers import TokenProviders

from mailbroker_sandbox.ca import create_ca
from mailbroker_sandbox.token_server import TokenServer
from tests.fixtures.events import context

METADATA_AND_LINK_LOCAL = [
    "169.254.169.254",  # EC2 / Lambda instance metadata
    "169.254.170.2",  # ECS task credentials
    "fd00:ec2::254",  # EC2 instance metadata over IPv6
    "fe80::1",
    "::ffff:169.254.169.254",  # the metadata address, IPv4-mapped
]
# Not literal addresses, so no parser sees them as such; every resolver maps them to 169.254.169.254.
NAMES_OF_THE_METADATA_SERVICE = ["2852039166", "0251.0376.0251.0376", "169.254.43518"]
PASSWORD = "planted-smtp-password-4d1c"


@functools.cache
def service_account_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem.decode()


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def integration_data(provider: str, *, smtp: dict | None = None, token_host: str | None = None) -> dict:
    base = {
        "id": "probe",
        "provider": provider,
        "smtp": smtp or {"host": "smtp.example.com"},
        "username": "probe@example.com",
    }
    token_url = f"https://{url_host(token_host)}/token" if token_host else None
    if provider == "microsoft":
        extra = {"tenant_id": "t", "client_id": "c", "client_secret": "s"}
        if token_host:
            extra["authority"] = f"https://{url_host(token_host)}"
    elif provider == "google":
        extra = {"client_id": "c", "client_secret": "s", "refresh_token": "r"}
        if token_url:
            extra["token_uri"] = token_url
    elif provider == "oauth2":
        token_url = token_url or "https://auth.example.com/token"
        extra = {"client_id": "c", "client_secret": "s", "scope": "smtp", "token_url": token_url}
    elif provider == "google_service_account":
        key = {"client_email": "sa@p.iam.gserviceaccount.com", "private_key": service_account_key()}
        if token_url:
            key["token_uri"] = token_url
        extra = {"service_account_info": key, "subject": "probe@example.com"}
    else:
        extra = {"password": PASSWORD}
    return {**base, **extra}


# ---------------------------------------------------------------- refused in the configuration


@pytest.mark.parametrize("host", METADATA_AND_LINK_LOCAL)
def test_smtp_host_at_a_metadata_or_link_local_address_is_refused(host):
    with pytest.raises(InvalidIntegration) as refused:
        parse_integration(integration_data("basic", smtp={"host": host}))

    assert "smtp" in str(refused.value)
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize("provider", ["microsoft", "google", "oauth2", "google_service_account"])
@pytest.mark.parametrize("host", METADATA_AND_LINK_LOCAL)
def test_token_url_at_a_metadata_or_link_local_address_is_refused(provider, host):
    with pytest.raises(InvalidIntegration) as refused:
        parse_integration(integration_data(provider, token_host=host))

    assert "link-local or instance-metadata" in str(refused.value)


@pytest.mark.parametrize("host", ["smtp.example.com", "10.0.0.25", "192.0.2.7", "2001:db8::25"])
def test_cleartext_smtp_to_a_host_off_loopback_is_refused(host):
    with pytest.raises(InvalidIntegration) as refused:
        parse_integration(integration_data("basic", smtp={"host": host, "port": 25, "security": "none"}))

    assert "loopback" in str(refused.value)


@pytest.mark.parametrize("provider", ["google", "oauth2"])
def test_cleartext_token_url_off_loopback_is_refused(provider):
    data = integration_data(provider)
    data["token_uri" if provider == "google" else "token_url"] = "http://auth.example.com/token"

    with pytest.raises(InvalidIntegration) as refused:
        parse_integration(data)

    assert "https" in str(refused.value)


# ---------------------------------------------------------------- refused where a name becomes addresses


@pytest.mark.parametrize("name", NAMES_OF_THE_METADATA_SERVICE)
def test_smtp_host_that_resolves_to_the_metadata_service_gets_no_connection(name):
    integration = parse_integration(integration_data("basic", smtp={"host": name, "port": 587}))
    session = SmtpSession(integration.smtp, username=integration.username, auth=BasicAuth(PASSWORD))

    with pytest.raises(SmtpFailure) as refused:
        session.open()

    assert refused.value.code == "address_not_allowed"
    assert session.auth_count == 0


@pytest.mark.parametrize("provider", ["microsoft", "google", "oauth2", "google_service_account"])
@pytest.mark.parametrize("name", NAMES_OF_THE_METADATA_SERVICE)
def test_token_url_that_resolves_to_the_metadata_service_gets_no_request(provider, name):
    integration = parse_integration(integration_data(provider, token_host=name))

    with pytest.raises(TokenError) as refused:
        TokenProviders(http_timeout=2).fetch(integration)

    assert refused.value.code == "address_not_allowed"


# ---------------------------------------------------------------- TLS verified


@pytest.fixture(scope="module")
def impostor_token_server(tmp_path_factory):
    """Token endpoints whose certificate comes from a CA nobody trusts."""
    with TokenServer(create_ca(tmp_path_factory.mktemp("impostor-ca"))) as server:
        server.register_microsoft_app("contoso", "app-1", "planted-ms-secret-91b2")
        server.register_google_client("gclient-1", "planted-google-secret-5e0a")
        server.register_oauth2_client("oclient-1", "planted-oauth2-secret-c3d4", scope="smtp")
        yield server


@pytest.mark.parametrize("provider", ["microsoft", "google", "oauth2"])
def test_token_endpoint_with_an_untrusted_certificate_gets_no_request(
    provider, impostor_token_server, ca_trust_env
):
    server = impostor_token_server
    data = integration_data(provider)
    if provider == "microsoft":
        data.update(tenant_id="contoso", client_id="app-1", authority=server.base_url)
    elif provider == "google":
        data.update(client_id="gclient-1", token_uri=server.google_token_uri)
    else:
        data.update(client_id="oclient-1", token_url=server.oauth2_token_url)
    before = server.requests

    with pytest.raises(TokenError) as failed:
        TokenProviders(http_timeout=2).fetch(parse_integration(data))

    assert failed.value.code == "tls_failed"
    assert server.requests == before


def smtp_endpoint(server, security):
    return parse_integration(
        integration_data("basic", smtp={"host": "127.0.0.1", "port": server.port, "security": security})
    ).smtp


def xoauth2_from(tokens_handed_out):
    def provide(force_refresh: bool = False) -> str:
        tokens_handed_out.append(force_refresh)
        return "planted-access-token-0a9f"

    return XOAuth2Auth(provide)


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_smtp_server_with_an_untrusted_certificate_never_sees_auth(mode, smtp_server, ca_trust_env):
    server = smtp_server(mode=mode, trusted_cert=False)
    handed_out: list[bool] = []
    session = SmtpSession(
        smtp_endpoint(server, mode), username="probe@example.com", auth=xoauth2_from(handed_out)
    )

    with pytest.raises(SmtpFailure) as failed:
        session.open()

    assert failed.value.code == "tls_failed"
    assert server.auth_attempts == 0
    assert handed_out == []


def test_smtp_server_without_starttls_never_sees_auth(smtp_server, ca_trust_env):
    server = smtp_server(mode="none")
    session = SmtpSession(
        smtp_endpoint(server, "starttls"), username="probe@example.com", auth=BasicAuth(PASSWORD)
    )

    with pytest.raises(SmtpFailure) as failed:
        session.open()

    assert failed.value.code == "tls_failed"
    assert server.auth_attempts == 0


def test_cleartext_to_a_loopback_server_is_allowed(smtp_server, ca_trust_env):
    server = smtp_server(mode="none")
    server.add_mailbox("probe@example.com", password=PASSWORD)
    session = SmtpSession(
        smtp_endpoint(server, "none"), username="probe@example.com", auth=BasicAuth(PASSWORD)
    )

    with session:
        session.open()

    assert server.auth_successes == 1


# ---------------------------------------------------------------- a cached token needs its credential


@pytest.fixture
def broker_env(stack, aws_env, token_server, ca_trust_env, monkeypatch):
    for name, value in stack.function_env("TokenBrokerFunction").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKEN_HTTP_TIMEOUT_SECONDS", "2")
    runtime.reset()
    yield stack.function_env("TokenBrokerFunction")
    runtime.reset()


def test_integration_copying_anothers_identity_without_its_secret_gets_no_token(broker_env, token_server):
    from token_broker.app import lambda_handler

    store = IntegrationStore(runtime.aws_client("secretsmanager"), broker_env["SECRET_PREFIX"], max_age=0)
    token_server.register_microsoft_app("contoso", "app-shared", "planted-real-secret-77aa")
    identity = {
        "provider": "microsoft",
        "smtp": {"host": "smtp.example.com"},
        "username": "ceo@contoso.com",
        "tenant_id": "contoso",
        "client_id": "app-shared",
        "authority": token_server.base_url,
    }
    store.put(parse_integration({**identity, "id": "real", "client_secret": "planted-real-secret-77aa"}))
    store.put(parse_integration({**identity, "id": "copycat", "client_secret": "a-guess"}))
    real = lambda_handler({"integration": "real"}, context("TokenBrokerFunction", memory_limit_in_mb=256))

    copy = lambda_handler({"integration": "copycat"}, context("TokenBrokerFunction", memory_limit_in_mb=256))

    assert "access_token" in real
    assert copy.get("error", {}).get("code") == "token_invalid_client"
    assert real["access_token"] not in str(copy)
