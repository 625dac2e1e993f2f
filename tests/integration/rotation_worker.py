"""A separate process standing in for one Lambda execution environment that asks for a delegated
Microsoft token again and again for ``seconds``: its own memory cache and boto3 clients, the same
DynamoDB table, secret and token endpoint as every other. With ``die_after_refresh``, the first
environment to refresh (one, across all of them) exits the moment its refresh is stored, before it
writes the secret back or answers: a function killed right after the provider answered."""

from __future__ import annotations

import os
import time
from typing import Any


def run(
    integration_id: str, ready: Any, start: Any, results: Any, seconds: float, pause: float, die: Any
) -> None:
    import msal  # noqa: F401 (imported before the clock starts, as a warm environment has it)
    from mailbroker import runtime
    from mailbroker.errors import MailbrokerError

    broker = runtime.token_broker()
    if die is not None:
        _die_after_first_stored_rotation(broker, die)
    ready.put(os.getpid())
    answers: list[tuple[str, str, float]] = []
    start.wait(timeout=120)
    until = time.time() + seconds
    while time.time() < until:
        try:
            token = broker.token_for(integration_id)
            answers.append((token.source, token.access_token[-12:], time.time()))
        except MailbrokerError as exc:
            answers.append(("error", exc.code, time.time()))
        except Exception as exc:  # a defect: reported to the test, which fails naming it
            answers.append(("error", f"crash {type(exc).__name__}: {exc}", time.time()))
        time.sleep(pause)
    results.put(answers)


def _die_after_first_stored_rotation(broker: Any, die: Any) -> None:
    save = broker.store.save

    def save_then_die(key: str, owner: str, token: Any, rotation: Any = None) -> Any:
        version = save(key, owner, token, rotation)
        if rotation is not None and version is not None:
            with die.get_lock():
                chosen = die.value == 0
                if chosen:
                    die.value = os.getpid()
            if chosen:  # outside the lock: the others still take it
                os._exit(9)
        return version

    broker.store.save = save_then_die
