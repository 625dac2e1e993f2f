"""``mailbroker errors``: the error catalogue for operators, and docs/troubleshooting.md kept in step
with it."""

from __future__ import annotations

import json
from pathlib import Path

from mailbroker.errors import CATALOGUE

from mailbroker_cli.main import main

TROUBLESHOOTING = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_troubleshooting_page_is_generated_from_the_catalogue(capsys):
    code, out = run(capsys, "errors", "--markdown")

    assert code == 0
    assert out == TROUBLESHOOTING.read_text(encoding="utf-8"), (
        "docs/troubleshooting.md is stale: mailbroker errors --markdown > docs/troubleshooting.md"
    )


def test_troubleshooting_page_has_one_row_per_code_with_its_hint():
    rows = [
        line for line in TROUBLESHOOTING.read_text(encoding="utf-8").splitlines() if line.startswith("| `")
    ]

    assert [row.split("`")[1] for row in rows] == list(CATALOGUE)
    for row, kind in zip(rows, CATALOGUE.values(), strict=True):
        assert kind.hint.replace("|", "\\|") in row


def test_errors_json_lists_every_code_with_its_retry_rule_and_http_status(capsys):
    code, out = run(capsys, "errors", "--json")

    listed = json.loads(out)
    assert code == 0
    assert {entry["code"]: (entry["retryable"], entry["http_status"]) for entry in listed} == {
        code: (kind.retryable, kind.http_status) for code, kind in CATALOGUE.items()
    }
