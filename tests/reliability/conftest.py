"""Reliability tests race several environments against the same DynamoDB items: their moto
server applies item operations one at a time, as DynamoDB does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.dynamodb_atomicity import AtomicMotoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[AtomicMotoServer]:
    with AtomicMotoServer() as server:
        yield server
