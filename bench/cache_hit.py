"""Figure 6: network calls on a cache hit, counted (not timed).

The token broker as the token broker function wires it (``runtime.token_broker()``: the
integration from Secrets Manager, DynamoDB and KMS on moto, the sandbox's Microsoft endpoint).
Every HTTP request botocore sends is counted with a ``before-send`` hook registered on the default
boto3 session before the runtime builds its clients; token-endpoint requests are counted by the
sandbox server.

* memory hit: the same environment asks again → target 0 calls;
* DynamoDB hit: the environment's memory is emptied while another environment's token is in
  DynamoDB (its data key already known) → target 1 call, a GetItem.

Baselines, counted the same way: MSAL alone answering from its own memory cache, and MSAL alone in
an environment that does not hold the token (it can only ask the provider).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench import Row, Target
from bench.environment import environ

TENANT = "bench-tenant"
SECRET = "bench-cache-hit-secret-51d0"
SCOPE = "https://outlook.office365.com/.default"


class CallCounter:
    """Counts every HTTP request botocore sends, as ``service.Operation``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, event_name: str, **kwargs: Any) -> None:
        _, service, operation = event_name.split(".", 2)
        self.calls[f"{service}.{operation}"] += 1

    def take(self) -> Counter[str]:
        taken, self.calls = self.calls, Counter()
        return taken


def run(sandbox: Any, *, smoke: bool) -> list[Row]:
    server = sandbox.token_server()
    server.register_microsoft_app(TENANT, "bench-cache-hit", SECRET)
    server.register_microsoft_app(TENANT, "bench-cache-hit-msal", SECRET)
    env = sandbox.function_env("TokenBrokerFunction")
    with environ(env):
        import boto3
        from mailbroker import runtime
        from mailbroker.integrations import parse_integration

        boto3.setup_default_session()
        counter = CallCounter()
        boto3.DEFAULT_SESSION.events.register("before-send", counter)
        try:
            runtime.integration_store().put(
                parse_integration(
                    {
                        "id": "bench-cache-hit",
                        "provider": "microsoft",
                        "smtp": {"host": "127.0.0.1", "port": 2587},
                        "username": "cache-hit@contoso.example",
                        "tenant_id": TENANT,
                        "client_id": "bench-cache-hit",
                        "client_secret": SECRET,
                        "authority": server.base_url,
                    }
                )
            )
            broker = runtime.token_broker()

            def count(call: Any) -> tuple[int, dict[str, int], str]:
                counter.take()
                requests_before = server.requests
                source = call()
                aws = counter.take()
                endpoint = server.requests - requests_before
                calls = dict(aws)
                if endpoint:
                    calls["token endpoint"] = endpoint
                return sum(aws.values()) + endpoint, calls, source

            first = count(lambda: broker.token_for("bench-cache-hit").source)
            memory = count(lambda: broker.token_for("bench-cache-hit").source)
            broker.forget_memory()
            dynamodb = count(lambda: broker.token_for("bench-cache-hit").source)
        finally:
            boto3.DEFAULT_SESSION = None
        msal_memory, msal_miss = _msal_baseline(server)

    _expect(memory[2], "memory")
    _expect(dynamodb[2], "cache")
    return [
        Row(
            "network calls on a memory hit",
            memory[0],
            msal_memory[0],
            baseline_label="MSAL memory hit",
            target=Target(0),
            details={"mailbroker": memory[1], "msal": msal_memory[1], "first_call": first[1]},
        ),
        Row(
            "network calls on a DynamoDB hit",
            dynamodb[0],
            msal_miss[0],
            baseline_label="MSAL, token not in its cache",
            target=Target(1),
            details={"mailbroker": dynamodb[1], "msal": msal_miss[1]},
        ),
    ]


def _msal_baseline(server: Any) -> tuple[tuple[int, dict[str, int]], tuple[int, dict[str, int]]]:
    """HTTP requests of MSAL alone, counted on its session: a memory hit, and a warm application
    whose cache does not hold the token (what it does when another environment fetched one)."""
    import msal
    import requests

    session = requests.Session()
    sent: Counter[str] = Counter()
    session.hooks["response"].append(lambda response, *a, **k: sent.update([_kind(response.url)]))
    app = msal.ConfidentialClientApplication(
        "bench-cache-hit-msal",
        client_credential=SECRET,
        authority=f"{server.base_url}/{TENANT}",
        instance_discovery=False,
        http_client=session,
    )
    app.acquire_token_for_client(scopes=[SCOPE])
    sent.clear()
    result = app.acquire_token_for_client(scopes=[SCOPE])
    if result.get("token_source") != "cache":
        raise RuntimeError(f"MSAL did not answer from its cache: {result.get('token_source')}")
    hit = dict(sent)
    sent.clear()
    app.remove_tokens_for_client()
    app.acquire_token_for_client(scopes=[SCOPE])
    miss = dict(sent)
    return (sum(hit.values()), hit), (sum(miss.values()), miss)


def _kind(url: str) -> str:
    return "token endpoint" if url.endswith("/token") else "OIDC discovery"


def _expect(source: str, wanted: str) -> None:
    if source != wanted:
        raise RuntimeError(f"the broker answered from {source!r}, the figure needs {wanted!r}")
