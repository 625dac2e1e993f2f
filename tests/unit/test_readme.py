"""The README's promises that code can check: the troubleshooting table is the catalogue's, and
the commands it names exist."""

from __future__ import annotations

import re
from pathlib import Path

from mailbroker_cli.main import troubleshooting_markdown

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_troubleshooting_table_is_generated_from_the_error_catalogue():
    block = README.split("<!-- troubleshooting:start -->")[1].split("<!-- troubleshooting:end -->")[0]
    expected = [line for line in troubleshooting_markdown().splitlines() if line.startswith("|")]
    assert [line for line in block.splitlines() if line.strip()] == expected


def test_readme_opens_with_the_two_commands_a_newcomer_runs():
    quick_start = README.split("## Quick start")[1].split("##")[0]
    assert "make run" in quick_start and "make test" in quick_start


def test_every_make_target_the_readme_names_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.M))
    named = set(re.findall(r"`make ([a-z-]+)", README))
    assert named and named <= targets


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
