"""Figure 1: token calls per credential per lifetime under concurrency.

N separate processes (multiprocessing "spawn": each its own interpreter and memory cache, like N
Lambda execution environments) ask for the same credential continuously. Every process hosts one
client of each kind, on its own thread, each counted separately by the sandbox's token endpoint:

* mailbroker: ``TokenBroker`` with its DynamoDB level and refresh lease on moto;
* MSAL cache: ``msal.ConfidentialClientApplication.acquire_token_for_client`` with MSAL's own
  in-memory cache, one application per process (what a Lambda using MSAL alone gets);
* no cache: the same call with the cache emptied first.

"Lifetime" is the time a cache serves one token before it asks for the next: MSAL treats a token
as expired 5 minutes before ``expires_in``, the broker refreshes ahead by its margin. The sandbox
issues the broker's tokens with a lifetime whose refresh point falls after ``interval`` seconds and
MSAL's with ``300 + interval`` seconds, so both caches hold each token for the same ``interval``.
mailbroker and MSAL run side by side for ``windows x interval`` seconds, counted once every
process has started and made its first call; tokens per lifetime = tokens issued ÷ ``windows``.
With one refresh per lifetime across all processes the broker scores at most 1.0 (each refresh
comes a little later than ``interval`` after the one before); MSAL scores about N. The uncached
client then runs alone for one interval, so that its load on the token endpoint does not slow the
others' refreshes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench import Row, Target

TENANT = "bench-tenant"
SCOPE = "https://outlook.office365.com/.default"
MSAL_EXPIRY_BUFFER = 300  # seconds before expires_in at which MSAL stops serving a cached token
SECRET = "bench-client-secret-3c9e"
VARIANTS = ("mailbroker", "msal", "none")


@dataclass(frozen=True)
class Plan:
    processes: tuple[int, ...]
    interval: float  # seconds a cache serves one token
    windows: int  # lifetimes counted
    pause: float = 0.05  # between two requests of one client
    stagger: float = 0.1  # between two process starts
    start_timeout: float = 300.0


FULL = Plan(processes=(1, 4, 16, 64), interval=5.0, windows=4)
SMOKE = Plan(processes=(1, 4), interval=2.0, windows=2)  # whole seconds: MSAL truncates expires_in

# The broker refreshes when less than max(min margin, fraction x lifetime) remains, the margin
# capped at half the lifetime. Half: a token served for ``interval`` stays usable (while one
# environment refreshes it) for most of another, as 50 of 60 minutes with 10 minutes to spare do.
REFRESH_FRACTION = 0.5
# Clients that run side by side, then the one that runs alone.
PHASES = (("mailbroker", "msal"), ("none",))


def run(sandbox: Any, *, smoke: bool) -> list[Row]:
    plan = SMOKE if smoke else FULL
    broker_lifetime = plan.interval / (1 - REFRESH_FRACTION)
    broker_server = sandbox.token_server(lifetime=broker_lifetime)
    msal_server = sandbox.token_server(lifetime=MSAL_EXPIRY_BUFFER + plan.interval)
    env = sandbox.function_env(
        "TokenBrokerFunction",
        TOKEN_REFRESH_MIN_MARGIN_SECONDS="0",
        TOKEN_REFRESH_FRACTION=str(REFRESH_FRACTION),
        TOKEN_LEASE_TTL_SECONDS="3",
        TOKEN_LEASE_WAIT_SECONDS="5",
        TOKEN_HTTP_TIMEOUT_SECONDS="5",
    )
    _check_interval(env, broker_lifetime, plan.interval)
    rows: list[Row] = []
    for n in plan.processes:
        result = measure(n, plan, env, broker_server, msal_server)
        per_lifetime = {v: result["issued"][v] / result["lifetimes"][v] for v in VARIANTS}
        common = {
            "processes": n,
            "interval_s": plan.interval,
            "window_s": result["window_s"],
            "broker_token_lifetime_s": round(broker_lifetime, 3),
            "msal_token_lifetime_s": MSAL_EXPIRY_BUFFER + plan.interval,
            **{k: result[k] for k in ("issued", "calls", "errors", "sources")},
        }
        for variant, label in (("msal", "MSAL cache per process"), ("none", "no cache")):
            rows.append(
                Row(
                    f"token calls per lifetime, N={n}" + (", vs no cache" if variant == "none" else ""),
                    per_lifetime["mailbroker"],
                    per_lifetime[variant],
                    baseline_label=label,
                    target=Target(1.0),
                    details=common,
                )
            )
    return rows


def _check_interval(env: dict[str, str], lifetime: float, interval: float) -> None:
    """The broker's own policy must put the refresh where the plan expects it."""
    from mailbroker.settings import TokenPolicyEnv
    from mailbroker.tokens.model import CachedToken, RefreshPolicy

    settings = TokenPolicyEnv.from_env(env)
    policy = RefreshPolicy(min_margin=settings.refresh_min_margin, fraction=settings.refresh_fraction)
    served = policy.refresh_at(CachedToken("x", issued_at=0.0, expires_at=lifetime))
    if abs(served - interval) > 1e-6:
        raise RuntimeError(f"broker would serve a token {served:.3f} s, the plan expects {interval} s")


def measure(n: int, plan: Plan, env: dict[str, str], broker_server: Any, msal_server: Any) -> dict[str, Any]:
    client_ids = {v: f"bench-{v}-n{n}" for v in VARIANTS}
    broker_server.register_microsoft_app(TENANT, client_ids["mailbroker"], SECRET)
    for variant in ("msal", "none"):
        msal_server.register_microsoft_app(TENANT, client_ids[variant], SECRET)
    spec = {
        "integration": {
            "id": f"bench-n{n}",
            "provider": "microsoft",
            "smtp": {"host": "127.0.0.1", "port": 2587},
            "username": "bench@contoso.example",
            "tenant_id": TENANT,
            "client_id": client_ids["mailbroker"],
            "client_secret": SECRET,
            "authority": broker_server.base_url,
        },
        "msal_authority": f"{msal_server.base_url}/{TENANT}",
        "client_ids": client_ids,
        "pause": plan.pause,
    }
    servers = {"mailbroker": broker_server, "msal": msal_server, "none": msal_server}
    windows = {PHASES[0]: plan.windows, PHASES[1]: 1}

    def issued() -> dict[str, int]:
        return {v: servers[v].issued(client_id=client_ids[v]) for v in VARIANTS}

    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    go = [ctx.Event() for _ in PHASES]
    stop = [ctx.Event() for _ in PHASES]
    processes = []
    counted: dict[str, int] = {}
    lifetimes: dict[str, int] = {}
    window_s: dict[str, float] = {}
    reports: list[dict[str, Any]] = []
    try:
        for _ in range(n):
            process = ctx.Process(target=worker, args=(env, spec, go, stop, results), daemon=True)
            process.start()
            processes.append(process)
            time.sleep(plan.stagger)
        _collect(results, "ready", n, plan.start_timeout, processes)
        for phase, names in enumerate(PHASES):
            go[phase].set()
            _collect(results, "started", n, 60.0, processes)
            time.sleep(plan.pause * 4)
            before, started = issued(), time.monotonic()
            time.sleep(windows[names] * plan.interval)
            after, elapsed = issued(), time.monotonic() - started
            stop[phase].set()
            reports += _collect(results, "done", n, 60.0, processes)
            for name in names:
                counted[name] = after[name] - before[name]
                lifetimes[name] = windows[names]
                window_s[name] = round(elapsed, 2)
    finally:
        for process in processes:  # every report is in: no need to wait for interpreters to wind down
            process.terminate()
        for process in processes:
            process.join(timeout=10)
    totals: dict[str, Any] = {"calls": Counter(), "errors": Counter(), "sources": Counter()}
    for report in reports:
        for key in totals:
            totals[key].update(report[key])
    return {
        "issued": counted,
        "lifetimes": lifetimes,
        "window_s": window_s,
        **{key: dict(counter) for key, counter in totals.items()},
    }


def _collect(results: Any, kind: str, n: int, timeout: float, processes: list[Any]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while len(got) < n:
        try:
            message = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in processes if not p.is_alive() and p.exitcode]
            if dead:
                raise RuntimeError(f"{len(dead)} worker process(es) died (exit {dead[0].exitcode})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(got)} of {n} workers reported {kind!r} in time") from None
            continue
        if message.get("kind") == "failed":
            raise RuntimeError(f"a worker failed: {message['error']}")
        if message.get("kind") == kind:
            got.append(message)
    return got


def worker(env: dict[str, str], spec: dict[str, Any], go: list[Any], stop: list[Any], results: Any) -> None:
    """One execution environment: one client of each kind for the same credential, each on its
    own thread while its phase runs."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the process's lifetime
    os.environ.update(env)
    try:
        clients = _clients(spec)
    except Exception as exc:
        results.put({"kind": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    results.put({"kind": "ready"})
    for phase, names in enumerate(PHASES):
        go[phase].wait()
        report = _run_phase({name: clients[name] for name in names}, spec["pause"], stop[phase], results)
        results.put({"kind": "done", **report})


def _run_phase(clients: dict[str, Any], pause: float, stop: Any, results: Any) -> dict[str, Any]:
    calls: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    first = threading.Barrier(len(clients) + 1)
    local_stop = threading.Event()

    def loop(name: str, call: Any) -> None:
        announced = False
        while not local_stop.is_set():
            try:
                source = call()
                calls[name] += 1
                if source:
                    sources[source] += 1
            except Exception as exc:
                errors[f"{name}: {type(exc).__name__}"] += 1
            if not announced:
                announced = True
                with contextlib.suppress(threading.BrokenBarrierError):
                    first.wait(timeout=60)
            local_stop.wait(pause)

    threads = [threading.Thread(target=loop, args=item, daemon=True) for item in clients.items()]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        first.wait(timeout=60)
    results.put({"kind": "started"})
    stop.wait()
    local_stop.set()
    for thread in threads:
        thread.join(timeout=30)
    return {"calls": calls, "errors": errors, "sources": sources}


def _clients(spec: dict[str, Any]) -> dict[str, Any]:
    import msal
    from mailbroker import runtime
    from mailbroker.integrations import parse_integration
    from mailbroker.settings import TokenCacheEnv

    integration = parse_integration(spec["integration"])
    broker = runtime.build_token_broker(TokenCacheEnv.from_env(os.environ), _OneIntegration(integration))

    def msal_app(variant: str) -> Any:
        return msal.ConfidentialClientApplication(
            spec["client_ids"][variant],
            client_credential=SECRET,
            authority=spec["msal_authority"],
            instance_discovery=False,
        )

    cached, uncached = msal_app("msal"), msal_app("none")

    def with_broker() -> str:
        return broker.token_for(integration.id).source

    def with_msal_cache() -> str:
        return _token_source(cached.acquire_token_for_client(scopes=[SCOPE]))

    def without_cache() -> str:
        uncached.remove_tokens_for_client()
        return _token_source(uncached.acquire_token_for_client(scopes=[SCOPE]))

    return {"mailbroker": with_broker, "msal": with_msal_cache, "none": without_cache}


def _token_source(result: dict[str, Any]) -> str:
    if "access_token" not in result:
        raise RuntimeError(result.get("error", "no token"))
    return ""


class _OneIntegration:
    """The integration store of a process that serves one integration."""

    def __init__(self, integration: Any) -> None:
        self._integration = integration

    def get(self, integration_id: str) -> Any:
        return self._integration
