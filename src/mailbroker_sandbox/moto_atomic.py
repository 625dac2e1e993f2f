"""moto server whose DynamoDB applies each item operation atomically, as the real service does.

moto evaluates a ``ConditionExpression`` and applies the update in separate Python steps, so two
threads of its server can both pass one condition. The token broker's refresh lease, the sender's
status claims and the governor all rest on conditional writes being atomic; the sandbox runs
moto's DynamoDB item operations one at a time so that a limit broken in the sandbox is broken by
mailbroker, not by the emulator. ``python -m mailbroker_sandbox.moto_atomic`` takes moto.server's
arguments.
"""

from __future__ import annotations

import contextlib
import functools
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


if __name__ == "__main__":
    from moto.server import main

    with atomic_item_writes():
        main(sys.argv[1:])
