"""The project stands alone: its design lives in docs/design.md, nothing points at a document
outside the repository, and the design names what the template and the error catalogue define."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mailbroker.errors import CATALOGUE

from mailbroker_sandbox.aws import load_template

ROOT = Path(__file__).resolve().parents[2]
DESIGN = (ROOT / "docs" / "design.md").read_text()

# Spelled so that this file does not match itself (an escaped dot, a character class).
OUTSIDE_REFERENCE = re.compile(r"DESIGN\.md|CONVENTIONS\.md|shared[/]")
NOT_OURS = {".git", ".venv", ".tools", ".aws-sam", "node_modules"}


def tracked_files() -> list[Path]:
    """The files git tracks, or, outside a git checkout, every file but the generated ones."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(
            ["git", "ls-files", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [ROOT / name for name in listed.split("\0") if name]
    return [
        path
        for path in ROOT.rglob("*")
        if path.is_file()
        and not NOT_OURS & set(path.relative_to(ROOT).parts)
        and "__pycache__" not in path.parts
    ]


def test_no_file_refers_to_a_document_outside_the_repository():
    offenders = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary, or deleted in the working tree
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "point at docs/design.md instead:\n" + "\n".join(offenders)


def test_the_readme_links_the_design():
    assert "](docs/design.md)" in (ROOT / "README.md").read_text()


def _design_section(title: str) -> str:
    return DESIGN.split(f"## {title}")[1].split("\n## ")[0]


def test_every_error_code_the_design_names_is_in_the_catalogue():
    named = set(re.findall(r"^\| `([a-z_]+)` \|", _design_section("Errors"), flags=re.M))
    assert named, "the design's error table is empty"
    assert named <= set(CATALOGUE)


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template(ROOT / "template.yaml")


def _functions(template: dict) -> list[dict]:
    return [
        resource.get("Properties") or {}
        for resource in template["Resources"].values()
        if resource.get("Type") == "AWS::Serverless::Function"
    ]


def test_the_design_lists_every_http_route_of_the_template(template):
    routes = {
        (event["Properties"]["Method"].upper(), event["Properties"]["Path"])
        for function in _functions(template)
        for event in (function.get("Events") or {}).values()
        if event.get("Type") == "HttpApi"
    }
    assert routes
    listed = _design_section("HTTP API")
    missing = [f"{method} {path}" for method, path in sorted(routes) if f"`{method} {path}`" not in listed]
    assert not missing, f"add these routes to docs/design.md, 'HTTP API': {missing}"


def test_the_design_names_every_environment_variable_the_template_sets(template):
    globals_ = ((template.get("Globals") or {}).get("Function") or {}).get("Environment") or {}
    names = set(globals_.get("Variables") or {})
    for function in _functions(template):
        names |= set(((function.get("Environment") or {}).get("Variables")) or {})
    ours = {name for name in names if not name.startswith("POWERTOOLS_")}
    assert ours
    listed = _design_section("Environment")
    missing = sorted(name for name in ours if f"`{name}`" not in listed)
    assert not missing, f"add these variables to docs/design.md, 'Environment': {missing}"
