"""A separate process standing in for one Lambda execution environment: its own memory cache,
its own boto3 clients, the same DynamoDB table and token endpoint as every other."""

from __future__ import annotations

import time
from typing import Any


def run(integration_id: str, barrier: Any, results: Any, phases: int, calls_per_phase: int) -> None:
    from mailbroker import runtime

    broker = runtime.token_broker()
    answers = []
    for _ in range(phases):
        barrier.wait(timeout=120)
        for _ in range(calls_per_phase):
            token = broker.token_for(integration_id)
            answers.append((token.source, token.access_token[-12:], round(time.time(), 3)))
        barrier.wait(timeout=120)
    results.put(answers)
