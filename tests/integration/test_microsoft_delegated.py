"""Delegated Microsoft credentials: a user's refresh token that rotates on every use. The sandbox's
Entra stand-in refuses a refresh token once redeemed (stricter than Microsoft, on purpose), so any
rotation lost anywhere shows as invalid_grant."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest
from mailbroker import runtime
from mailbroker.integrations import IntegrationStore, parse_integration
from mailbroker.tokens.model import fingerprint

USER = "ana@outlook.example"


@pytest.fixture
def broker_env(stack, aws_env, token_server, ca_trust_env, monkeypatch):
    for name, value in stack.function_env("TokenBrokerFunction").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKEN_HTTP_TIMEOUT_SECONDS", "5")
    runtime.reset()
    yield stack.function_env("TokenBrokerFunction")
    runtime.reset()


@pytest.fixture
def integrations(broker_env):
    return IntegrationStore(runtime.aws_client("secretsmanager"), broker_env["SECRET_PREFIX"], max_age=0)


def delegated(token_server, integrations, id, **extra):
    client_id = "public-" + id
    token_server.register_microsoft_app("consumers", client_id, public_client=True)
    refresh = token_server.issue_microsoft_refresh_token("consumers", client_id, USER)
    integrations.put(
        parse_integration(
            {
                "id": id,
                "provider": "microsoft_delegated",
                "smtp": {"host": "127.0.0.1", "port": 2587},
                "username": USER,
                "tenant_id": "consumers",
                "client_id": client_id,
                "refresh_token": refresh,
                "authority": token_server.base_url,
                **extra,
            }
        )
    )
    return client_id, refresh


def secret_refresh_token(integrations, id):
    raw = integrations._client.get_secret_value(SecretId=integrations.secret_name(id))["SecretString"]
    return json.loads(raw)["refresh_token"]


def test_each_refresh_redeems_the_newest_refresh_token_and_writes_it_back(token_server, integrations):
    client_id, first = delegated(token_server, integrations, "outlook-ana")
    broker = runtime.token_broker()

    one = broker.token_for("outlook-ana")
    two = broker.token_for("outlook-ana", force_refresh=True, rejected_token=one.access_token)
    runtime.reset()  # a cold start: only the table and the secret remember
    three = runtime.token_broker().token_for("outlook-ana", rejected_token=two.access_token)

    assert [one.source, two.source, three.source] == ["provider", "provider", "provider"]
    assert token_server.refresh_token_reuse == 0
    assert token_server.live_microsoft_refresh_tokens(client_id) == 1
    claims = token_server.introspect(three.access_token)
    assert claims["sub"] == USER and "SMTP.Send" in claims["scope"]
    # The first rotation is written back at once; later ones wait for the write-back interval.
    assert secret_refresh_token(integrations, "outlook-ana") != first


def test_confidential_delegated_client_authenticates_with_its_certificate(token_server, integrations):
    from mailbroker_cli.certificates import self_signed

    key, cert = self_signed("mailbroker delegated-cert")
    token_server.register_microsoft_app("contoso", "conf-app", certificates=[cert])
    refresh = token_server.issue_microsoft_refresh_token("contoso", "conf-app", USER)
    integrations.put(
        parse_integration(
            {
                "id": "delegated-cert",
                "provider": "microsoft_delegated",
                "smtp": {"host": "127.0.0.1", "port": 2587},
                "username": USER,
                "tenant_id": "contoso",
                "client_id": "conf-app",
                "refresh_token": refresh,
                "client_certificate": {"private_key": key, "certificate": cert},
                "authority": token_server.base_url,
            }
        )
    )

    token = runtime.token_broker().token_for("delegated-cert")

    assert token_server.introspect(token.access_token)["client_id"] == "conf-app"


def test_expired_refresh_token_is_invalid_grant_naming_the_microsoft_reconsent(token_server, integrations):
    client_id, _ = delegated(token_server, integrations, "outlook-idle")
    token_server.expire_microsoft_refresh_tokens(client_id)

    from token_broker.app import lambda_handler

    answer = lambda_handler({"integration": "outlook-idle"}, _Context())

    assert answer["error"]["code"] == "token_invalid_grant"
    assert "AADSTS700082" in answer["error"]["message"]
    assert "mailbroker consent microsoft" in answer["error"]["hint"]


def test_a_secret_given_a_fresh_consent_wins_over_the_chain_in_the_table(token_server, integrations):
    client_id, _ = delegated(token_server, integrations, "outlook-again")
    broker = runtime.token_broker()
    old = broker.token_for("outlook-again")
    fresh = token_server.issue_microsoft_refresh_token("consumers", client_id, USER)
    document = json.loads(
        integrations._client.get_secret_value(SecretId=integrations.secret_name("outlook-again"))[
            "SecretString"
        ]
    )
    integrations.put(parse_integration(document | {"refresh_token": fresh}))

    new = runtime.token_broker().token_for("outlook-again", rejected_token=old.access_token)
    runtime.reset()
    later = runtime.token_broker().token_for("outlook-again", rejected_token=new.access_token)

    assert new.source == later.source == "provider"
    assert token_server.refresh_token_reuse == 0
    # Written back within the interval: the secret still holds the consent the new chain began from.
    assert fingerprint(secret_refresh_token(integrations, "outlook-again")) == fingerprint(fresh)


def _rotation_run(token_server, integrations, monkeypatch, *, id, kill):
    lifetime, margin, seconds = 8.0, 3.0, 24.0  # due 5 s after issue: three lifetimes at least
    token_server.lifetime = lifetime
    monkeypatch.setenv("TOKEN_REFRESH_MIN_MARGIN_SECONDS", str(margin))
    monkeypatch.setenv("REFRESH_TOKEN_WRITE_BACK_SECONDS", "5")
    runtime.reset()
    client_id, first = delegated(token_server, integrations, id)
    token_server.reset_counts()

    from tests.integration import rotation_worker

    processes = 16
    ctx = multiprocessing.get_context("spawn")
    ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    die = ctx.Value("i", 0) if kill else None
    workers = [
        ctx.Process(target=rotation_worker.run, args=(id, ready, start, results, seconds, 0.2, die))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:  # every interpreter started and imported before the clock runs
            ready.get(timeout=300)
        started = time.time()
        start.set()
        answers = []
        for _ in range(processes - (1 if kill else 0)):
            answers.append(results.get(timeout=seconds + 120))
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    runtime.reset()
    afterwards = runtime.token_broker().token_for(id, force_refresh=True)
    flat = [a for answer in answers for a in answer]
    sources = [source for source, _, _ in flat]
    elapsed = max(at for _, _, at in flat) - started  # the span the environments asked over
    print(  # the figures for the record (pytest -s)
        f"rotation run {id}: {len(sources)} answers, {sources.count('provider')} from the provider, "
        f"{token_server.issued(client_id=client_id)} tokens issued over {elapsed / lifetime:.1f} lifetimes, "
        f"{sources.count('error')} errors, {token_server.refresh_token_reuse} redeemed refresh tokens reused"
    )
    return {
        "answers": flat,
        "issued": token_server.issued(client_id=client_id),
        "lifetimes": elapsed / lifetime,
        "afterwards": afterwards,
        "killed": die.value if kill else None,
        "exit_codes": [w.exitcode for w in workers],
        "secret": secret_refresh_token(integrations, id),
        "first": first,
        "client_id": client_id,
    }


def assert_rotation_held(run, token_server):
    errors = [code for source, code, _ in run["answers"] if source == "error"]
    # A rotation lost anywhere would show as invalid_grant (the sandbox refuses a redeemed token).
    assert "token_invalid_grant" not in errors
    assert token_server.refresh_token_reuse == 0
    # On a starved machine a caller may time out waiting for a slow refresh (retryable, and
    # counted in the figures printed above); nothing else may fail.
    assert set(errors) <= {"token_unavailable"}
    assert len(errors) < len(run["answers"])
    assert run["lifetimes"] >= 3
    # About one provider call per lifetime: one each time the token is due (5 s), plus the check after.
    assert 3 <= run["issued"] <= run["lifetimes"] * 8.0 / 5.0 + 3, run["issued"]
    assert run["afterwards"].source == "provider"
    assert token_server.live_microsoft_refresh_tokens(run["client_id"]) == 1
    assert run["secret"] != run["first"]  # written back, within the interval


@pytest.mark.slow  # sixteen interpreters: over a minute on a loaded machine (make test-long)
@pytest.mark.timeout(900)
def test_sixteen_environments_rotate_a_delegated_refresh_token_without_losing_it(
    token_server, integrations, monkeypatch
):
    run = _rotation_run(token_server, integrations, monkeypatch, id="outlook-16", kill=False)

    assert_rotation_held(run, token_server)


@pytest.mark.slow  # sixteen interpreters: over a minute on a loaded machine (make test-long)
@pytest.mark.timeout(900)
def test_an_environment_killed_right_after_a_refresh_strands_nothing(token_server, integrations, monkeypatch):
    run = _rotation_run(token_server, integrations, monkeypatch, id="outlook-kill", kill=True)

    assert run["killed"] != 0
    assert sorted(run["exit_codes"]).count(9) == 1
    assert_rotation_held(run, token_server)


class _Context:
    function_name = "TokenBrokerFunction"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:TokenBrokerFunction"
    aws_request_id = "c0ffee00-0000-4000-8000-000000000003"
