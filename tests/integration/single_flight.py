"""Sixteen processes, each standing in for one Lambda execution environment (its own memory cache
and boto3 clients, the same token table and endpoints), ask for one integration's token in a burst,
then again once the stored token is due for refresh but still valid."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from mailbroker import runtime

PROCESSES = 16


def sixteen_environments(integration: Any, *, lifetime: float, margin: float) -> tuple[list[str], Any]:
    """Run the two phases; returns every answer's source, and a hook to read counts between them
    (called once the burst is over, before the second phase)."""
    from tests.integration import broker_worker

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=broker_worker.run, args=(integration.id, barrier, results, 2, 5))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=120)  # phase 1: everyone starts together
        barrier.wait(timeout=120)  # phase 1 done
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
    return [source for answer in answers for source, _, _ in answer], stored
