"""The layer ships exactly the runtime dependencies pyproject.toml declares (minus boto3)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _names(requirements: list[str]) -> dict[str, str]:
    return {re.split(r"[\[<>=!~ ]", r, maxsplit=1)[0].lower(): r for r in requirements}


def test_layer_requirements_match_pyproject_runtime_dependencies():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    layer = [
        line.strip()
        for line in (ROOT / "layers/mailbroker/requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    expected = {k: v for k, v in _names(declared).items() if k != "boto3"}
    assert _names(layer) == expected


def test_every_function_has_a_thin_handler_module():
    for name in ("token_broker", "sender", "keeper"):
        source = (ROOT / "functions" / name / "app.py").read_text()
        assert "def lambda_handler(event" in source
        assert "boto3" not in source
