"""The sandbox token endpoints answer the real client libraries the way the providers do.

MSAL, google-auth and google-auth-oauthlib talk to the server over HTTPS, trusting the sandbox
CA through REQUESTS_CA_BUNDLE / SSL_CERT_FILE; only their endpoint URLs differ from production.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import google.auth.transport.requests
import jwt
import msal
import pytest
import requests
from google.auth.exceptions import RefreshError
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from google_auth_oauthlib.flow import Flow

from mailbroker_sandbox.token_server import TokenServer

OUTLOOK_SCOPE = "https://outlook.office365.com/.default"
MAIL_SCOPE = "https://mail.google.com/"
REDIRECT_URI = "http://127.0.0.1:8765/callback"


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class App:
    tenant_id: str
    client_id: str
    secret: str


@pytest.fixture
def server(token_server: TokenServer, ca_trust_env: dict[str, str]) -> TokenServer:
    return token_server


@pytest.fixture
def ms_app(server: TokenServer) -> App:
    app = App(str(uuid.uuid4()), str(uuid.uuid4()), secrets.token_urlsafe(24))
    server.register_microsoft_app(app.tenant_id, app.client_id, app.secret)
    return app


@pytest.fixture
def google_client(server: TokenServer) -> App:
    client = App("", f"{_uid('client')}.apps.googleusercontent.com", secrets.token_urlsafe(24))
    server.register_google_client(client.client_id, client.secret)
    return client


@pytest.fixture
def oauth2_client(server: TokenServer) -> App:
    client = App("", _uid("relay"), secrets.token_urlsafe(24))
    server.register_oauth2_client(client.client_id, client.secret, scope="smtp.send smtp.read")
    return client


def _msal(server: TokenServer, app: App, secret: str | None = None) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        app.client_id,
        client_credential=secret or app.secret,
        authority=f"{server.microsoft_authority()}/{app.tenant_id}",
        instance_discovery=False,
        http_client=requests.Session(),
    )


def _google_credentials(server: TokenServer, client: App, refresh_token: str) -> user_credentials.Credentials:
    return user_credentials.Credentials(
        None,
        refresh_token=refresh_token,
        token_uri=server.google_token_uri,
        client_id=client.client_id,
        client_secret=client.secret,
        scopes=[MAIL_SCOPE],
    )


def _refresh_form(client: App, refresh_token: str) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "client_id": client.client_id,
        "client_secret": client.secret,
        "refresh_token": refresh_token,
    }


def _consent(server: TokenServer, client: App, **extra: str) -> dict[str, list[str]]:
    """Drive the consent screen and return the query of the redirect back to the app."""
    params = {
        "client_id": client.client_id,
        "redirect_uri": REDIRECT_URI,
        "response_type": "code",
        "scope": MAIL_SCOPE,
        "state": "st-123",
        "access_type": "offline",
        "prompt": "consent",
        **extra,
    }
    response = requests.get(server.authorization_url, params=params, allow_redirects=False, timeout=5)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return parse_qs(urlsplit(location).query)


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


# --- Microsoft Entra ID ---------------------------------------------------------------------------


def test_msal_acquires_an_app_token_with_client_credentials(server: TokenServer, ms_app: App) -> None:
    result = _msal(server, ms_app).acquire_token_for_client([OUTLOOK_SCOPE])

    assert result["token_type"] == "Bearer"
    assert result["expires_in"] == 3600
    view = server.introspect(result["access_token"])
    assert view is not None
    assert view["active"] is True
    assert (view["provider"], view["client_id"], view["tid"], view["sub"]) == (
        "microsoft",
        ms_app.client_id,
        ms_app.tenant_id,
        None,
    )
    assert view["roles"] == ["SMTP.SendAsApp"]


def test_microsoft_token_is_an_rs256_jwt_verifiable_with_the_published_keys(
    server: TokenServer, ms_app: App
) -> None:
    token = _msal(server, ms_app).acquire_token_for_client([OUTLOOK_SCOPE])["access_token"]
    config = requests.get(
        f"{server.base_url}/{ms_app.tenant_id}/v2.0/.well-known/openid-configuration", timeout=5
    ).json()
    jwks = requests.get(config["jwks_uri"], timeout=5).json()

    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(
        token, key, algorithms=["RS256"], audience="https://outlook.office.com", issuer=config["issuer"]
    )

    assert claims["tid"] == ms_app.tenant_id
    assert claims["appid"] == ms_app.client_id
    assert claims["roles"] == ["SMTP.SendAsApp"]
    assert claims["oid"] and claims["nbf"] <= claims["iat"] < claims["exp"]
    assert config["token_endpoint"] == server.microsoft_token_url(ms_app.tenant_id)


def test_wrong_client_secret_is_refused_with_aadsts7000215(server: TokenServer, ms_app: App) -> None:
    result = _msal(server, ms_app, secret="not-the-secret").acquire_token_for_client([OUTLOOK_SCOPE])

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert server.issued(provider="microsoft") == 0


def test_wrong_client_secret_answers_http_401(server: TokenServer, ms_app: App) -> None:
    response = requests.post(
        server.microsoft_token_url(ms_app.tenant_id),
        data={
            "grant_type": "client_credentials",
            "client_id": ms_app.client_id,
            "client_secret": "wrong",
            "scope": OUTLOOK_SCOPE,
        },
        timeout=5,
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_unknown_app_is_refused_with_aadsts700016(server: TokenServer, ms_app: App) -> None:
    stranger = App(ms_app.tenant_id, str(uuid.uuid4()), "whatever")

    result = _msal(server, stranger).acquire_token_for_client([OUTLOOK_SCOPE])

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700016]


def test_expired_client_secret_is_refused_with_aadsts7000222(server: TokenServer) -> None:
    app = App(str(uuid.uuid4()), str(uuid.uuid4()), "old-secret")
    server.register_microsoft_app(app.tenant_id, app.client_id, app.secret, secret_expires_at=time.time() - 1)

    result = _msal(server, app).acquire_token_for_client([OUTLOOK_SCOPE])

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000222]


def test_scope_without_default_suffix_is_refused_with_aadsts70011(server: TokenServer, ms_app: App) -> None:
    result = _msal(server, ms_app).acquire_token_for_client(["https://outlook.office365.com/SMTP.SendAsApp"])

    assert result["error"] == "invalid_scope"
    assert result["error_codes"] == [70011]


def test_client_secret_basic_is_accepted_by_the_microsoft_endpoint(server: TokenServer, ms_app: App) -> None:
    response = requests.post(
        server.microsoft_token_url(ms_app.tenant_id),
        data={"grant_type": "client_credentials", "scope": OUTLOOK_SCOPE},
        auth=(ms_app.client_id, ms_app.secret),
        timeout=5,
    )

    assert response.status_code == 200
    assert set(response.json()) == {"token_type", "expires_in", "ext_expires_in", "access_token"}


def test_unknown_tenant_is_refused_at_discovery_so_msal_cannot_start(
    server: TokenServer, ms_app: App
) -> None:
    stranger = App(str(uuid.uuid4()), ms_app.client_id, ms_app.secret)

    discovery = requests.get(
        f"{server.base_url}/{stranger.tenant_id}/v2.0/.well-known/openid-configuration", timeout=5
    )

    assert discovery.status_code == 400
    assert discovery.json()["error_codes"] == [90002]
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        _msal(server, stranger)


def test_microsoft_error_echoes_the_client_request_id(server: TokenServer, ms_app: App) -> None:
    response = requests.post(
        server.microsoft_token_url(ms_app.tenant_id),
        data={"grant_type": "client_credentials", "client_id": ms_app.client_id, "scope": OUTLOOK_SCOPE},
        headers={"client-request-id": "corr-42"},
        timeout=5,
    )

    assert response.status_code == 401
    assert response.json()["error_codes"] == [7000218]
    assert response.json()["correlation_id"] == "corr-42"
    assert response.headers["client-request-id"] == "corr-42"


# --- Google: refresh tokens ------------------------------------------------------------------------


def test_google_auth_refreshes_a_user_token_with_a_refresh_token(
    server: TokenServer, google_client: App
) -> None:
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")
    creds = _google_credentials(server, google_client, refresh_token)

    creds.refresh(google.auth.transport.requests.Request())

    assert creds.token.startswith("ya29.")
    assert creds.valid
    view = server.introspect(creds.token)
    assert view is not None
    assert (view["provider"], view["sub"], view["scope"], view["active"]) == (
        "google",
        "ana@example.com",
        MAIL_SCOPE,
        True,
    )


def test_google_token_response_has_the_provider_fields(server: TokenServer, google_client: App) -> None:
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")

    response = requests.post(
        server.google_token_uri, data=_refresh_form(google_client, refresh_token), timeout=5
    )

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_in", "scope", "token_type"}
    assert (body["expires_in"], body["scope"], body["token_type"]) == (3600, MAIL_SCOPE, "Bearer")


def test_revoked_refresh_token_answers_invalid_grant(server: TokenServer, google_client: App) -> None:
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")
    server.revoke_refresh_token(refresh_token)

    response = requests.post(
        server.google_token_uri, data=_refresh_form(google_client, refresh_token), timeout=5
    )

    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_grant",
        "error_description": "Token has been expired or revoked.",
    }


def test_google_auth_raises_refresh_error_for_an_unknown_refresh_token(
    server: TokenServer, google_client: App
) -> None:
    creds = _google_credentials(server, google_client, "1//0" + secrets.token_urlsafe(40))

    with pytest.raises(RefreshError) as caught:
        creds.refresh(google.auth.transport.requests.Request())

    assert caught.value.args[1]["error"] == "invalid_grant"
    assert caught.value.retryable is False


def test_wrong_google_client_secret_answers_401_unauthorized(server: TokenServer, google_client: App) -> None:
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")
    form = {**_refresh_form(google_client, refresh_token), "client_secret": "wrong"}

    response = requests.post(server.google_token_uri, data=form, timeout=5)

    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client", "error_description": "Unauthorized"}


def test_revoking_a_refresh_token_deactivates_the_access_tokens_minted_from_it(
    server: TokenServer, google_client: App
) -> None:
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")
    access_token = requests.post(
        server.google_token_uri, data=_refresh_form(google_client, refresh_token), timeout=5
    ).json()["access_token"]

    revoked = requests.post(server.revocation_url, data={"token": refresh_token}, timeout=5)

    assert revoked.status_code == 200
    assert requests.post(server.introspection_url, data={"token": access_token}, timeout=5).json() == {
        "active": False
    }


# --- Google: service accounts with domain-wide delegation --------------------------------------------


def test_service_account_gets_a_token_for_a_delegated_subject(server: TokenServer) -> None:
    info = server.register_service_account(allowed_subjects=["boss@example.com"])
    creds = service_account.Credentials.from_service_account_info(
        info, scopes=[MAIL_SCOPE], subject="boss@example.com"
    )

    creds.refresh(google.auth.transport.requests.Request())

    view = server.introspect(creds.token)
    assert view is not None
    assert (view["provider"], view["sub"], view["client_id"], view["active"]) == (
        "google_service_account",
        "boss@example.com",
        info["client_id"],
        True,
    )
    assert server.issued(provider="google_service_account", subject="boss@example.com") == 1


def test_service_account_without_subject_list_may_impersonate_anyone(server: TokenServer) -> None:
    info = server.register_service_account()
    subject = f"{_uid('anyone')}@example.com"
    creds = service_account.Credentials.from_service_account_info(info, scopes=[MAIL_SCOPE], subject=subject)

    creds.refresh(google.auth.transport.requests.Request())

    assert server.issued(subject=subject) == 1


def test_subject_outside_delegation_answers_unauthorized_client(server: TokenServer) -> None:
    info = server.register_service_account(allowed_subjects=["boss@example.com"])
    creds = service_account.Credentials.from_service_account_info(
        info, scopes=[MAIL_SCOPE], subject="intern@example.com"
    )

    with pytest.raises(RefreshError) as caught:
        creds.refresh(google.auth.transport.requests.Request())

    assert caught.value.args[1]["error"] == "unauthorized_client"
    assert caught.value.args[1]["error_description"].startswith(
        "Client is unauthorized to retrieve access tokens"
    )


def test_assertion_signed_with_another_key_answers_invalid_jwt_signature(server: TokenServer) -> None:
    info = server.register_service_account()
    other = server.register_service_account()
    forged = {**info, "private_key": other["private_key"]}
    creds = service_account.Credentials.from_service_account_info(
        forged, scopes=[MAIL_SCOPE], subject="boss@example.com"
    )

    with pytest.raises(RefreshError) as caught:
        creds.refresh(google.auth.transport.requests.Request())

    assert caught.value.args[1] == {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}


def test_expired_assertion_answers_invalid_grant(server: TokenServer) -> None:
    info = server.register_service_account()
    now = int(time.time())
    assertion = jwt.encode(
        {
            "iss": info["client_email"],
            "aud": server.google_token_uri,
            "scope": MAIL_SCOPE,
            "sub": "boss@example.com",
            "iat": now - 7200,
            "exp": now - 3600,
        },
        info["private_key"],
        algorithm="RS256",
        headers={"kid": info["private_key_id"]},
    )

    response = requests.post(
        server.google_token_uri,
        data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion},
        timeout=5,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "short-lived" in response.json()["error_description"]


# --- Google: authorisation-code flow ----------------------------------------------------------------


def test_consent_redirects_back_with_code_state_and_scope(server: TokenServer, google_client: App) -> None:
    query = _consent(server, google_client)

    assert query["state"] == ["st-123"]
    assert query["scope"] == [MAIL_SCOPE]
    assert query["code"][0].startswith("4/")


def test_authorization_code_exchange_returns_refresh_token_for_the_hinted_user(
    server: TokenServer, google_client: App
) -> None:
    verifier = secrets.token_urlsafe(48)
    code = _consent(
        server,
        google_client,
        login_hint="bo@example.com",
        code_challenge=_s256(verifier),
        code_challenge_method="S256",
    )["code"][0]

    response = requests.post(
        server.google_token_uri,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": google_client.client_id,
            "client_secret": google_client.secret,
            "code_verifier": verifier,
        },
        timeout=5,
    )

    assert response.status_code == 200
    body = response.json()
    assert body["refresh_token"].startswith("1//")
    assert body["scope"] == MAIL_SCOPE and body["expires_in"] == 3600
    creds = _google_credentials(server, google_client, body["refresh_token"])
    creds.refresh(google.auth.transport.requests.Request())
    assert server.issued(provider="google", subject="bo@example.com") == 2


def test_consent_without_login_hint_is_given_by_the_configured_user(
    server: TokenServer, google_client: App
) -> None:
    server.consent_user = "carla@example.com"
    code = _consent(server, google_client)["code"][0]

    body = requests.post(
        server.google_token_uri,
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
        auth=(google_client.client_id, google_client.secret),
        timeout=5,
    ).json()

    assert server.introspect(body["access_token"])["sub"] == "carla@example.com"


def test_wrong_code_verifier_answers_invalid_grant(server: TokenServer, google_client: App) -> None:
    verifier = secrets.token_urlsafe(48)
    code = _consent(server, google_client, code_challenge=_s256(verifier), code_challenge_method="S256")[
        "code"
    ][0]

    response = requests.post(
        server.google_token_uri,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": secrets.token_urlsafe(48),
        },
        auth=(google_client.client_id, google_client.secret),
        timeout=5,
    )

    assert response.status_code == 400
    assert response.json() == {"error": "invalid_grant", "error_description": "Invalid code verifier."}


def test_authorization_code_can_be_redeemed_only_once(server: TokenServer, google_client: App) -> None:
    code = _consent(server, google_client)["code"][0]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    auth = (google_client.client_id, google_client.secret)
    first = requests.post(server.google_token_uri, data=form, auth=auth, timeout=5)

    second = requests.post(server.google_token_uri, data=form, auth=auth, timeout=5)

    assert first.status_code == 200
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"


def test_denied_consent_redirects_back_with_access_denied(server: TokenServer, google_client: App) -> None:
    server.deny_consent = True

    query = _consent(server, google_client)

    assert query == {"error": ["access_denied"], "state": ["st-123"]}


def test_consent_refuses_a_non_loopback_redirect_uri(server: TokenServer, google_client: App) -> None:
    response = requests.get(
        server.authorization_url,
        params={
            "client_id": google_client.client_id,
            "redirect_uri": "https://attacker.example/cb",
            "response_type": "code",
            "scope": MAIL_SCOPE,
        },
        allow_redirects=False,
        timeout=5,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "redirect_uri_mismatch"


def test_google_auth_oauthlib_flow_completes_against_the_sandbox(
    server: TokenServer, google_client: App
) -> None:
    config = {
        "installed": {
            "client_id": google_client.client_id,
            "client_secret": google_client.secret,
            "auth_uri": server.authorization_url,
            "token_uri": server.google_token_uri,
        }
    }
    flow = Flow.from_client_config(config, scopes=[MAIL_SCOPE], redirect_uri=REDIRECT_URI)
    url, _state = flow.authorization_url(
        access_type="offline", prompt="consent", login_hint="dee@example.com"
    )
    location = requests.get(url, allow_redirects=False, timeout=5).headers["Location"]

    flow.fetch_token(code=parse_qs(urlsplit(location).query)["code"][0])

    assert flow.credentials.refresh_token.startswith("1//")
    assert server.introspect(flow.credentials.token)["sub"] == "dee@example.com"


# --- generic OAuth2 client credentials -----------------------------------------------------------------


def test_oauth2_client_credentials_with_client_secret_basic(server: TokenServer, oauth2_client: App) -> None:
    response = requests.post(
        server.oauth2_token_url,
        data={"grant_type": "client_credentials"},
        auth=(oauth2_client.client_id, oauth2_client.secret),
        timeout=5,
    )

    assert response.status_code == 200
    body = response.json()
    assert (body["token_type"], body["scope"], body["expires_in"]) == ("Bearer", "smtp.send smtp.read", 3600)
    assert server.introspect(body["access_token"])["provider"] == "oauth2"


def test_oauth2_client_credentials_with_client_secret_post_and_narrower_scope(
    server: TokenServer, oauth2_client: App
) -> None:
    response = requests.post(
        server.oauth2_token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": oauth2_client.client_id,
            "client_secret": oauth2_client.secret,
            "scope": "smtp.send",
        },
        timeout=5,
    )

    assert response.status_code == 200
    assert response.json()["scope"] == "smtp.send"


def test_oauth2_wrong_secret_over_basic_answers_401_with_www_authenticate(
    server: TokenServer, oauth2_client: App
) -> None:
    response = requests.post(
        server.oauth2_token_url,
        data={"grant_type": "client_credentials"},
        auth=(oauth2_client.client_id, "wrong"),
        timeout=5,
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_oauth2_scope_beyond_the_clients_answers_invalid_scope(
    server: TokenServer, oauth2_client: App
) -> None:
    response = requests.post(
        server.oauth2_token_url,
        data={"grant_type": "client_credentials", "scope": "smtp.send admin"},
        auth=(oauth2_client.client_id, oauth2_client.secret),
        timeout=5,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


def test_oauth2_unsupported_grant_type_is_refused(server: TokenServer, oauth2_client: App) -> None:
    response = requests.post(
        server.oauth2_token_url,
        data={"grant_type": "password", "username": "u", "password": "p"},
        auth=(oauth2_client.client_id, oauth2_client.secret),
        timeout=5,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


def test_oauth2_two_client_authentication_methods_are_refused(
    server: TokenServer, oauth2_client: App
) -> None:
    response = requests.post(
        server.oauth2_token_url,
        data={"grant_type": "client_credentials", "client_secret": oauth2_client.secret},
        auth=(oauth2_client.client_id, oauth2_client.secret),
        timeout=5,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


# --- introspection -------------------------------------------------------------------------------------


def test_introspection_describes_an_active_microsoft_token(server: TokenServer, ms_app: App) -> None:
    token = _msal(server, ms_app).acquire_token_for_client([OUTLOOK_SCOPE])["access_token"]

    view = requests.post(server.introspection_url, data={"token": token}, timeout=5).json()

    assert view["active"] is True
    assert view["provider"] == "microsoft"
    assert view["aud"] == "https://outlook.office.com"
    assert view["tid"] == ms_app.tenant_id
    assert view["scope"] == OUTLOOK_SCOPE
    assert view["exp"] > time.time()


def test_introspection_of_an_unknown_token_is_inactive(server: TokenServer) -> None:
    response = requests.post(server.introspection_url, data={"token": "ya29.not-issued-here"}, timeout=5)

    assert response.json() == {"active": False}
    assert server.introspect("ya29.not-issued-here") is None


def test_token_is_inactive_once_its_lifetime_has_passed(server: TokenServer, oauth2_client: App) -> None:
    server.lifetime = 0.3
    token = requests.post(
        server.oauth2_token_url,
        data={"grant_type": "client_credentials"},
        auth=(oauth2_client.client_id, oauth2_client.secret),
        timeout=5,
    ).json()["access_token"]
    time.sleep(0.4)

    response = requests.post(server.introspection_url, data={"token": token}, timeout=5)

    assert response.json() == {"active": False}
    assert server.introspect(token)["active"] is False


def test_fractional_lifetime_is_sent_as_a_number(server: TokenServer, google_client: App) -> None:
    server.lifetime = 1.5
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")

    body = requests.post(
        server.google_token_uri, data=_refresh_form(google_client, refresh_token), timeout=5
    ).json()

    assert body["expires_in"] == 1.5


# --- faults -------------------------------------------------------------------------------------------


def test_500_fault_fails_one_request_then_the_endpoint_recovers(
    server: TokenServer, oauth2_client: App
) -> None:
    server.fail_next("500")
    auth = (oauth2_client.client_id, oauth2_client.secret)

    first = requests.post(
        server.oauth2_token_url, data={"grant_type": "client_credentials"}, auth=auth, timeout=5
    )
    second = requests.post(
        server.oauth2_token_url, data={"grant_type": "client_credentials"}, auth=auth, timeout=5
    )

    assert first.status_code == 500
    assert second.status_code == 200


def test_429_fault_sends_retry_after(server: TokenServer, google_client: App) -> None:
    server.fail_next("429", retry_after=7)
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")

    response = requests.post(
        server.google_token_uri, data=_refresh_form(google_client, refresh_token), timeout=5
    )

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"


def test_timeout_fault_leaves_the_client_without_an_answer(server: TokenServer, oauth2_client: App) -> None:
    server.fail_next("timeout", delay=2.0)

    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(
            server.oauth2_token_url,
            data={"grant_type": "client_credentials"},
            auth=(oauth2_client.client_id, oauth2_client.secret),
            timeout=0.5,
        )
    assert server.requests == 1
    assert server.issued() == 0


def test_invalid_grant_fault_speaks_entra_to_msal(server: TokenServer, ms_app: App) -> None:
    server.fail_next("invalid_grant")

    result = _msal(server, ms_app).acquire_token_for_client([OUTLOOK_SCOPE])

    assert result["error"] == "invalid_grant"
    assert result["error_codes"] == [70000]


def test_invalid_client_fault_makes_google_auth_raise(server: TokenServer, google_client: App) -> None:
    server.fail_next("invalid_client")
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")

    with pytest.raises(RefreshError) as caught:
        _google_credentials(server, google_client, refresh_token).refresh(
            google.auth.transport.requests.Request()
        )

    assert caught.value.args[1] == {"error": "invalid_client", "error_description": "Unauthorized"}


def test_fault_with_path_filter_spares_other_endpoints(
    server: TokenServer, google_client: App, oauth2_client: App
) -> None:
    server.fail_next("500", path_contains="/oauth2/token")
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")

    google = requests.post(
        server.google_token_uri, data=_refresh_form(google_client, refresh_token), timeout=5
    )
    generic = requests.post(
        server.oauth2_token_url,
        data={"grant_type": "client_credentials"},
        auth=(oauth2_client.client_id, oauth2_client.secret),
        timeout=5,
    )

    assert google.status_code == 200
    assert generic.status_code == 500


def test_fault_repeats_the_given_number_of_times(server: TokenServer, oauth2_client: App) -> None:
    server.fail_next("429", times=2)
    auth = (oauth2_client.client_id, oauth2_client.secret)

    statuses = [
        requests.post(
            server.oauth2_token_url, data={"grant_type": "client_credentials"}, auth=auth, timeout=5
        ).status_code
        for _ in range(3)
    ]

    assert statuses == [429, 429, 200]


def test_google_auth_retries_a_500_by_itself(server: TokenServer, google_client: App) -> None:
    server.fail_next("500")
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")
    creds = _google_credentials(server, google_client, refresh_token)

    creds.refresh(google.auth.transport.requests.Request())

    assert creds.valid
    assert (server.requests, server.issued()) == (2, 1)


def test_msal_honours_retry_after_without_calling_again(server: TokenServer, ms_app: App) -> None:
    server.fail_next("429", retry_after=30)
    app = _msal(server, ms_app)

    first = app.acquire_token_for_client([OUTLOOK_SCOPE])
    second = app.acquire_token_for_client([OUTLOOK_SCOPE])

    assert first["error"] == second["error"] == "temporarily_unavailable"
    assert server.requests == 1


def test_unknown_fault_kind_is_rejected(server: TokenServer) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        server.fail_next("503")


def test_cleared_faults_no_longer_fire(server: TokenServer, oauth2_client: App) -> None:
    server.fail_next("500", times=5)
    server.clear_faults()

    response = requests.post(
        server.oauth2_token_url,
        data={"grant_type": "client_credentials"},
        auth=(oauth2_client.client_id, oauth2_client.secret),
        timeout=5,
    )

    assert response.status_code == 200


# --- counters ------------------------------------------------------------------------------------------


def test_issued_counts_by_provider_client_and_subject(
    server: TokenServer, google_client: App, ms_app: App
) -> None:
    for user in ("ana@example.com", "ana@example.com", "bo@example.com"):
        refresh_token = server.issue_refresh_token(google_client.client_id, user)
        requests.post(server.google_token_uri, data=_refresh_form(google_client, refresh_token), timeout=5)
    _msal(server, ms_app).acquire_token_for_client([OUTLOOK_SCOPE])

    assert server.issued() == 4
    assert server.issued(provider="google") == 3
    assert server.issued(client_id=ms_app.client_id) == 1
    assert server.issued(provider="google", subject="ana@example.com") == 2


def test_requests_count_every_outcome_and_reset_counts_zeroes_them(server: TokenServer, ms_app: App) -> None:
    app = _msal(server, ms_app)
    app.acquire_token_for_client([OUTLOOK_SCOPE])
    _msal(server, ms_app, secret="wrong").acquire_token_for_client([OUTLOOK_SCOPE])
    assert (server.requests, server.issued()) == (2, 1)

    server.reset_counts()

    assert (server.requests, server.issued()) == (0, 0)


# --- transport and hygiene -------------------------------------------------------------------------------


def test_every_answer_forbids_caching(server: TokenServer, ms_app: App, google_client: App) -> None:
    answers = [
        requests.get(
            f"{server.base_url}/{ms_app.tenant_id}/v2.0/.well-known/openid-configuration", timeout=5
        ),
        requests.post(server.google_token_uri, data={"grant_type": "refresh_token"}, timeout=5),
        requests.post(server.introspection_url, data={"token": "x"}, timeout=5),
        requests.get(f"{server.base_url}/nowhere", timeout=5),
        requests.delete(server.google_token_uri, timeout=5),
    ]

    assert [a.status_code for a in answers] == [200, 400, 200, 404, 501]
    assert [a.headers["Cache-Control"] for a in answers] == ["no-store"] * 5


def test_a_client_that_does_not_trust_the_sandbox_ca_is_refused(
    token_server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)

    with pytest.raises(requests.exceptions.SSLError):
        requests.post(token_server.oauth2_token_url, data={"grant_type": "client_credentials"}, timeout=5)


def test_no_secret_or_token_is_logged_or_written_to_stderr(
    server: TokenServer,
    ms_app: App,
    google_client: App,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailbroker_sandbox")  # the server's and its requests' logs
    refresh_token = server.issue_refresh_token(google_client.client_id, "ana@example.com")
    google_token = requests.post(
        server.google_token_uri, data=_refresh_form(google_client, refresh_token), timeout=5
    ).json()["access_token"]
    ms_token = _msal(server, ms_app).acquire_token_for_client([OUTLOOK_SCOPE])["access_token"]
    _msal(server, ms_app, secret="wrong-but-secret").acquire_token_for_client([OUTLOOK_SCOPE])
    requests.post(server.introspection_url, data={"token": google_token}, timeout=5)

    logged = caplog.text
    stderr = capfd.readouterr().err

    assert "issued a google access token" in logged
    assert "POST /token -> 200" in logged  # each request, by path only
    for credential in (
        ms_app.secret,
        google_client.secret,
        refresh_token,
        google_token,
        ms_token,
        "wrong-but-secret",
    ):
        assert credential not in logged
        assert credential not in stderr
    assert "POST /token" not in stderr
