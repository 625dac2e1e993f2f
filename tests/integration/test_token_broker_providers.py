"""The token broker end to end: real HTTPS token endpoints (the sandbox's), DynamoDB, KMS and
Secrets Manager on moto server, and the real handler — direct invoke and HTTP API."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest
from mailbroker import runtime
from mailbroker.integrations import IntegrationStore, parse_integration

from tests.fixtures.events import context, http_event

TOKEN_ROUTE = "POST /v1/integrations/{id}/token"
CLIENT_SECRET = "planted-client-secret-7f3a"


SAMPLE_CALLER_ROLE = "arn:aws:iam::123456789012:role/app-role"  # events/http_*.json


@pytest.fixture
def broker_env(stack, aws_env, token_server, ca_trust_env, monkeypatch):
    """The token broker function's environment from the template, pointed at the sandbox."""
    for name, value in stack.function_env("TokenBrokerFunction").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKEN_HTTP_TIMEOUT_SECONDS", "2")
    # The token route is closed by default: the sample events' caller is named here.
    monkeypatch.setenv("TOKEN_API_PRINCIPALS", SAMPLE_CALLER_ROLE)
    runtime.reset()
    yield stack.function_env("TokenBrokerFunction")
    runtime.reset()


@pytest.fixture
def integrations(broker_env):
    return IntegrationStore(runtime.aws_client("secretsmanager"), broker_env["SECRET_PREFIX"], max_age=0)


def add(integrations, data):
    integration = parse_integration(data)
    integrations.put(integration)
    return integration


def microsoft_integration(token_server, integrations, *, id="support-m365", secret=CLIENT_SECRET, **extra):
    token_server.register_microsoft_app("contoso", "app-" + id, CLIENT_SECRET, **extra)
    return add(
        integrations,
        {
            "id": id,
            "provider": "microsoft",
            "smtp": {"host": "127.0.0.1", "port": 2587},
            "username": "support@contoso.com",
            "tenant_id": "contoso",
            "client_id": "app-" + id,
            "client_secret": secret,
            "authority": token_server.base_url,
        },
    )


def google_integration(token_server, integrations, *, id="gmail", user="ana@gmail.example"):
    token_server.register_google_client("gclient-" + id, CLIENT_SECRET)
    refresh = token_server.issue_refresh_token("gclient-" + id, user)
    add(
        integrations,
        {
            "id": id,
            "provider": "google",
            "smtp": {"host": "127.0.0.1", "port": 2587},
            "username": user,
            "client_id": "gclient-" + id,
            "client_secret": CLIENT_SECRET,
            "refresh_token": refresh,
            "token_uri": token_server.google_token_uri,
        },
    )
    return refresh


def oauth2_integration(token_server, integrations):
    token_server.register_oauth2_client("generic-app", CLIENT_SECRET, scope="smtp.send")
    return add(
        integrations,
        {
            "id": "generic",
            "provider": "oauth2",
            "smtp": {"host": "127.0.0.1", "port": 2587},
            "username": "app@example.org",
            "token_url": token_server.oauth2_token_url,
            "client_id": "generic-app",
            "client_secret": CLIENT_SECRET,
            "scope": "smtp.send",
        },
    )


def invoke(event):
    from token_broker.app import lambda_handler

    return lambda_handler(event, context("TokenBrokerFunction", memory_limit_in_mb=256))


def test_microsoft_token_comes_from_msal_then_from_memory(token_server, integrations):
    microsoft_integration(token_server, integrations)

    first = invoke({"integration": "support-m365"})
    second = invoke({"integration": "support-m365", "force_refresh": False})

    assert first["source"] == "provider" and second["source"] == "memory"
    assert first["access_token"] == second["access_token"]
    claims = token_server.introspect(first["access_token"])
    assert claims["active"] and "SMTP.SendAsApp" in claims["roles"]
    assert token_server.issued(client_id="app-support-m365") == 1


def test_google_refresh_token_gives_a_token_bound_to_the_mailbox(token_server, integrations):
    google_integration(token_server, integrations, user="ana@gmail.example")

    answer = invoke({"integration": "gmail"})

    assert answer["token_type"] == "Bearer"
    assert token_server.introspect(answer["access_token"])["sub"] == "ana@gmail.example"


def test_workspace_service_account_impersonates_the_subject(token_server, integrations):
    key = token_server.register_service_account()
    add(
        integrations,
        {
            "id": "workspace",
            "provider": "google_service_account",
            "smtp": {"host": "127.0.0.1", "port": 2587},
            "username": "bo@corp.example",
            "subject": "bo@corp.example",
            "service_account_info": key,
        },
    )

    answer = invoke({"integration": "workspace"})

    claims = token_server.introspect(answer["access_token"])
    assert claims["sub"] == "bo@corp.example"
    assert claims["provider"] == "google_service_account"


def test_generic_oauth2_client_credentials(token_server, integrations):
    oauth2_integration(token_server, integrations)

    answer = invoke({"integration": "generic"})

    assert token_server.introspect(answer["access_token"])["client_id"] == "generic-app"


def test_second_environment_reads_dynamodb_instead_of_the_provider(token_server, integrations):
    microsoft_integration(token_server, integrations)
    first = invoke({"integration": "support-m365"})

    runtime.reset()  # a new execution environment: empty memory, new clients
    second = invoke({"integration": "support-m365"})

    assert second["source"] == "cache"
    assert second["access_token"] == first["access_token"]
    assert token_server.issued(client_id="app-support-m365") == 1


def test_wrong_client_secret_is_token_invalid_client_with_the_aadsts_hint(token_server, integrations):
    microsoft_integration(token_server, integrations, secret="not-the-secret")

    answer = invoke({"integration": "support-m365"})

    assert answer["error"]["code"] == "token_invalid_client"
    assert "AADSTS7000215" in answer["error"]["hint"]
    assert answer["error"]["retryable"] is False


def test_revoked_refresh_token_is_token_invalid_grant_asking_for_reconsent(token_server, integrations):
    refresh = google_integration(token_server, integrations)
    token_server.revoke_refresh_token(refresh)

    answer = invoke({"integration": "gmail"})

    assert answer["error"]["code"] == "token_invalid_grant"
    assert "mailbroker consent google" in answer["error"]["hint"]
    assert "7 days" in answer["error"]["hint"]


@pytest.mark.parametrize("fault", ["500", "timeout"])
def test_token_endpoint_failure_is_retryable_token_unavailable(token_server, integrations, fault):
    oauth2_integration(token_server, integrations)
    token_server.fail_next(fault, times=5, delay=4.0)

    answer = invoke({"integration": "generic"})

    assert answer["error"]["code"] == "token_unavailable"
    assert answer["error"]["retryable"] is True


def test_429_retry_after_is_reported_and_held_for_other_environments(token_server, integrations):
    oauth2_integration(token_server, integrations)
    token_server.fail_next("429", times=1, retry_after=30)

    first = invoke({"integration": "generic"})
    requests_after_first = token_server.requests
    runtime.reset()
    second = invoke({"integration": "generic"})

    assert first["error"]["code"] == second["error"]["code"] == "token_unavailable"
    assert first["error"]["retry_after"] == pytest.approx(30, abs=1)
    assert 0 < second["error"]["retry_after"] <= 30
    assert token_server.requests == requests_after_first  # the second environment did not ask


def test_unknown_integration_is_named(broker_env):
    answer = invoke({"integration": "nobody"})
    assert answer["error"]["code"] == "unknown_integration"


def test_invalid_direct_invoke_event_is_answered_not_raised(broker_env):
    answer = invoke({"integ": "typo"})
    assert answer["error"]["code"] == "invalid_request"
    assert {d["field"] for d in answer["error"]["details"]} >= {"integration", "integ"}


def test_invalid_secret_names_the_field_and_not_the_value(broker_env, integrations):
    runtime.aws_client("secretsmanager").create_secret(
        Name=broker_env["SECRET_PREFIX"] + "broken",
        SecretString=json.dumps(
            {
                "id": "broken",
                "provider": "microsoft",
                "smtp": {"host": "h"},
                "username": "u@x.example",
                "client_id": "c",
                "client_secret": CLIENT_SECRET,
            }
        ),
    )

    answer = invoke({"integration": "broken"})

    assert answer["error"]["code"] == "invalid_integration"
    assert "tenant_id" in answer["error"]["message"]
    assert CLIENT_SECRET not in json.dumps(answer)


def test_http_token_route_answers_the_token_json(token_server, integrations):
    microsoft_integration(token_server, integrations)

    response = invoke(http_event(TOKEN_ROUTE))

    assert response["statusCode"] == 200
    body = json.loads(response["body"])
    assert set(body) == {"access_token", "token_type", "expires_at", "source"}
    assert body["source"] == "provider"


def test_http_token_route_for_unknown_integration_is_404(broker_env):
    response = invoke(http_event(TOKEN_ROUTE, path_parameters={"id": "nobody"}))
    assert response["statusCode"] == 404
    assert json.loads(response["body"])["error"]["code"] == "unknown_integration"


def test_http_token_route_with_a_bad_body_is_400_with_field_errors(broker_env):
    event = http_event(TOKEN_ROUTE)
    event["body"] = json.dumps({"force_refresh": "sometimes", "extra": 1})

    response = invoke(event)

    assert response["statusCode"] == 400
    fields = {d["field"] for d in json.loads(response["body"])["error"]["details"]}
    assert any("force_refresh" in f for f in fields)


def test_http_unknown_route_is_404(broker_env):
    event = http_event(TOKEN_ROUTE)
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/v1/nothing-here"
    event["routeKey"] = event["requestContext"]["routeKey"] = "POST /v1/nothing-here"

    response = invoke(event)

    assert response["statusCode"] == 404


@pytest.fixture
def captured_logs():
    """Every record the service's logger emits, formatted as Powertools formats it (JSON with
    every extra field), at DEBUG."""
    import io
    import logging

    from mailbroker.observability import logger

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logger.registered_formatter)
    target = logging.getLogger(logger.name)
    previous = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    yield stream
    target.removeHandler(handler)
    target.setLevel(previous)


def test_no_secret_or_token_reaches_the_logs(token_server, integrations, captured_logs, capsys):
    microsoft_integration(token_server, integrations)
    refresh = google_integration(token_server, integrations)

    tokens = [
        invoke({"integration": "support-m365"})["access_token"],
        invoke({"integration": "gmail"})["access_token"],
    ]
    revoked = google_integration(token_server, integrations, id="gmail-revoked", user="bo@gmail.example")
    token_server.revoke_refresh_token(revoked)
    runtime.reset()
    assert invoke({"integration": "gmail-revoked"})["error"]["code"] == "token_invalid_grant"
    invoke(http_event(TOKEN_ROUTE))

    captured = capsys.readouterr()
    everything = captured_logs.getvalue() + captured.out + captured.err
    assert "token refreshed" in everything and "token refresh failed" in everything
    for secret in [CLIENT_SECRET, refresh, revoked, *tokens]:
        assert secret not in everything


def test_sixteen_environments_get_one_token_per_lifetime(token_server, integrations, monkeypatch):
    """16 processes, each its own memory cache, ask in a burst, then again once the token is due
    for refresh but still valid: the provider issues exactly one token per lifetime."""
    lifetime, margin = 16.0, 6.0  # due 6 s before expiry; usable until 1.6 s before it
    token_server.lifetime = lifetime
    monkeypatch.setenv("TOKEN_REFRESH_MIN_MARGIN_SECONDS", str(margin))
    integration = microsoft_integration(token_server, integrations)
    token_server.reset_counts()

    from tests.integration import broker_worker

    processes = 16
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=broker_worker.run, args=("support-m365", barrier, results, 2, 5))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=120)  # phase 1: everyone starts together
        barrier.wait(timeout=120)  # phase 1 done
        issued_in_burst = token_server.issued(client_id="app-support-m365")
        stored = runtime.token_broker().stored(integration)
        due = stored.issued_at + lifetime - margin
        time.sleep(max(due + 0.3 - time.time(), 0))  # due for refresh, still usable
        barrier.wait(timeout=120)  # phase 2
        barrier.wait(timeout=120)
        answers = [results.get(timeout=60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()

    assert issued_in_burst == 1
    assert token_server.issued(client_id="app-support-m365") == 2
    sources = [source for answer in answers for source, _, _ in answer]
    assert sources.count("provider") == 2
    assert len(sources) == processes * 10


def test_token_route_restricted_to_named_principals_refuses_others(token_server, integrations, monkeypatch):
    microsoft_integration(token_server, integrations)
    monkeypatch.setenv("TOKEN_API_PRINCIPALS", "arn:aws:iam::123456789012:role/mailer")
    runtime.reset()

    refused = invoke(http_event(TOKEN_ROUTE))  # the sample caller is app-role
    event = http_event(TOKEN_ROUTE)
    event["requestContext"]["authorizer"]["iam"]["userArn"] = (
        "arn:aws:sts::123456789012:assumed-role/mailer/run-1"
    )
    allowed = invoke(event)

    assert refused["statusCode"] == 403
    assert json.loads(refused["body"])["error"]["code"] == "caller_not_allowed"
    assert allowed["statusCode"] == 200
