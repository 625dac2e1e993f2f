"""Reliability tests: generated-input counts and the long runs' timeout. (They race several
environments against the same DynamoDB items; the sandbox's moto server applies item operations
one at a time, as DynamoDB does.)"""

from __future__ import annotations

from pathlib import Path

import pytest


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
