"""Reliability tests race several environments against the same DynamoDB items: their moto
server applies item operations one at a time, as DynamoDB does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.dynamodb_atomicity import AtomicMotoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[AtomicMotoServer]:
    with AtomicMotoServer() as server:
        yield server


def pytest_configure(config: pytest.Config) -> None:
    """Generated-input counts: a few hundred per property by default, 10,000 with ``--long``."""
    from hypothesis import HealthCheck, settings

    common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    settings.register_profile("mailbroker", max_examples=300, **common)
    settings.register_profile("mailbroker-long", max_examples=10_000, **common)
    settings.load_profile("mailbroker-long" if config.getoption("--long") else "mailbroker")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long runs take minutes per test: beyond the suite's default timeout."""
    if not config.getoption("--long"):
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.timeout(3600))
