"""moto server whose DynamoDB applies each item operation atomically, as the real service does,
and whose per-request costs do not grow with the queue.

moto evaluates a ``ConditionExpression`` and applies the update in separate Python steps, so two
threads of its server can both pass one condition. The token broker's refresh lease, the sender's
status claims and the governor all rest on conditional writes being atomic; the sandbox runs
moto's DynamoDB item operations one at a time so that a limit broken in the sandbox is broken by
mailbroker, not by the emulator.

Two of moto's costs are the emulator's, not the service's, and the sandbox leaves them out
(:func:`without_emulator_costs`): each ``ReceiveMessage`` checked every candidate message's
retention by computing all of the queue's attributes, which counts every message in the queue three
times (a receive from a queue of n messages cost n² steps); and every request listed moto's package
directory on disk to find its backend. Nor does the server log a line per request: its log is read
only when it fails to start, and errors are still logged. The answers are unchanged.

``python -m mailbroker_sandbox.moto_atomic`` takes moto.server's arguments, and
``--exit-with-parent``: exit as soon as stdin reaches end of file, which happens when the process
holding the other end of the pipe dies, however it dies.
"""

from __future__ import annotations

import contextlib
import functools
import logging
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


@contextlib.contextmanager
def without_emulator_costs() -> Iterator[None]:
    """While active, a receive reads the queue's retention period alone, the list of moto's
    service modules is read from disk once, and requests are not logged (warnings and errors are)."""
    from moto import backends
    from moto.core.utils import unix_time
    from moto.sqs.models import SQSBackend

    def is_message_valid_based_on_retention_period(self: Any, queue_name: str, message: Any) -> bool:
        retention_period = int(self.get_queue(queue_name).message_retention_period)
        return bool(retention_period + message.sent_timestamp / 1000 > unix_time())

    modules = tuple(backends.list_of_moto_modules())
    original_check = SQSBackend.is_message_valid_based_on_retention_period
    original_modules = backends.list_of_moto_modules
    SQSBackend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period  # type: ignore[method-assign]
    backends.list_of_moto_modules = lambda: modules
    requests_log = logging.getLogger("werkzeug")
    original_level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        SQSBackend.is_message_valid_based_on_retention_period = original_check  # type: ignore[method-assign]
        backends.list_of_moto_modules = original_modules
        requests_log.setLevel(original_level)


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
    with atomic_item_writes(), without_emulator_costs():
        main(arguments)
