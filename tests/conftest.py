"""Shared pytest set-up. Server fixtures live in plugin modules under tests/fixtures/."""

from __future__ import annotations

import os

import pytest

# Lambda sets the Powertools variables before a handler is imported, and Powertools reads them when
# its Logger and Metrics are built; the tests do the same, whatever module imports them first.
os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "mailbroker")
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "Mailbroker")

pytest_plugins = [
    "tests.fixtures.token_endpoints",
    "tests.fixtures.smtp",
    "tests.fixtures.aws",
    "tests.fixtures.pipeline",
    "tests.fixtures.mail_apis",
    "tests.fixtures.federation",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the long property-based, fault and load runs (tests marked slow)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: pass --long (make test-long)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
