"""The template passes the static checks a reviewer runs: cfn-lint reports nothing, and checkov
fails nothing — each check it skips is skipped in the template, next to the resource, with the
reason. (``make cfn`` runs both too; checkov lives in its own venv under ``.tools``.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
CHECKOV = ROOT / ".tools" / "checkov" / "bin" / "checkov"


def test_cfn_lint_reports_nothing():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), str(TEMPLATE)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert (result.returncode, result.stdout.strip()) == (0, ""), result.stdout + result.stderr


@pytest.fixture(scope="module")
def checkov_report():
    if not CHECKOV.exists():
        pytest.skip("checkov is installed by 'make tools' into .tools/checkov (its pins clash with ours)")
    result = subprocess.run(
        [
            str(CHECKOV),
            "--skip-download",
            "--framework",
            "cloudformation",
            "--file",
            str(TEMPLATE),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_fails_no_check(checkov_report):
    failed = [(c["check_id"], c["resource"]) for c in checkov_report["results"]["failed_checks"]]

    assert failed == []
    assert checkov_report["summary"]["passed"] > 0


def test_every_check_checkov_skips_is_justified_next_to_its_resource(checkov_report):
    skipped = checkov_report["results"]["skipped_checks"]

    unjustified = [
        (c["check_id"], c["resource"])
        for c in skipped
        if len((c.get("check_result", {}).get("suppress_comment") or "").split()) < 6
    ]
    assert unjustified == []
