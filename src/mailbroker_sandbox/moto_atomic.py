"""moto server whose DynamoDB applies each item operation atomically, as the real service does.

moto evaluates a ``ConditionExpression`` and applies the update in separate Python steps, so two
threads of its server can both pass one condition. The token broker's refresh lease, the sender's
status claims and the governor all rest on conditional writes being atomic; the sandbox runs
moto's DynamoDB item operations one at a time so that a limit broken in the sandbox is broken by
mailbroker, not by the emulator. ``python -m mailbroker_sandbox.moto_atomic`` takes moto.server's
arguments, and ``--exit-with-parent``: exit as soon as stdin reaches end of file, which happens
when the process holding the other end of the pipe dies, however it dies.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

_ITEM_OPERATIONS = ("get_item", "put_item", "update_item", "delete_item", "transact_write_items")
_lock = threading.RLock()


@contextlib.contextmanager
def atomic_item_writes() -> Iterator[None]:
    """While active, moto's DynamoDB item operations run one at a time (in this process)."""
    from moto.dynamodb.models import DynamoDBBackend

    originals = {name: getattr(DynamoDBBackend, name) for name in _ITEM_OPERATIONS}

    def serialised(method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _lock:
                return method(*args, **kwargs)

        return call

    for name, method in originals.items():
        setattr(DynamoDBBackend, name, serialised(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(DynamoDBBackend, name, method)


def exit_when_stdin_closes() -> None:
    """Watch stdin on a daemon thread; at end of file, exit at once (the owner is gone)."""

    def watch() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


if __name__ == "__main__":
    from moto.server import main

    arguments = sys.argv[1:]
    if "--exit-with-parent" in arguments:
        arguments.remove("--exit-with-parent")
        exit_when_stdin_closes()
    with atomic_item_writes():
        main(arguments)
