"""The README's first hour, as a newcomer follows it: ``mailbroker local`` (what ``make sandbox``
runs) in the background in its own process group, then, in another shell, the README's walkthrough
commands in order with the ``export`` lines the sandbox printed, then every example the sandbox
printed itself — each run exactly as printed, each succeeding."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.processes import child, sandbox_env

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
INTERACTIVE = ("mailbroker consent google",)  # waits for a person to approve and paste back


def readme_walkthrough() -> list[str]:
    block = README.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    lines = block.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    return [line for line in lines if line.strip()]


def printed_until_examples_end(output: str) -> bool:
    return "Then, for example:" in output and "--smtp-port" in output


def printed_exports(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.startswith("  export ")]


def printed_examples(output: str) -> list[str]:
    examples = output.split("Then, for example:", 1)[1].splitlines()
    return [
        line.strip()
        for line in examples
        if line.startswith("  ")
        and not line.strip().startswith("#")
        and not line.strip().startswith(INTERACTIVE)
    ]


def shell(preamble: list[str], command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``command`` in a new bash, after the preamble (activate + the exports), from the repository."""
    script = "\n".join([*preamble, command])
    return subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        start_new_session=True,
    )


@pytest.mark.xdist_group("walkthrough")
@pytest.mark.timeout(900)
def test_the_readme_walkthrough_runs_as_printed_against_the_sandbox(tmp_path):
    walkthrough = readme_walkthrough()
    assert walkthrough[0].startswith("source .venv/bin/activate")
    assert walkthrough[1].startswith("export ")  # stands for the lines the sandbox prints
    command = [sys.executable, "-m", "mailbroker_cli.main", "local"]
    env = {**sandbox_env(tmp_path), "NO_COLOR": "1"}
    with child(command, env=env) as local:
        local.read_until(printed_until_examples_end, 120, "the sandbox's printed examples")
        output = local.output
        local.descendants("mailbroker_sandbox.moto_atomic")  # killed with it however the test ends
        exports = printed_exports(output)
        exported = {line.split("=", 1)[0].removeprefix("export ") for line in exports}
        assert exported >= {"AWS_ENDPOINT_URL", "SEND_QUEUE_URL", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"}
        assert "Google OAuth    client " in output
        preamble = ["set -e", walkthrough[0].split("#")[0].strip(), *exports]
        results = {}
        for line in [*walkthrough[2:], *printed_examples(output)]:
            done = shell(preamble, line, env)
            results[line] = done
            assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        # The exported bundle trusts the system's CAs as well as the sandbox's.
        bundle = Path(next(line for line in exports if "SSL_CERT_FILE" in line).split("=", 1)[1].strip("'"))
        assert bundle.read_text().count("BEGIN CERTIFICATE") > 1
        local.signal(signal.SIGINT)
        assert local.wait(60) == 0

    by_start = {line.split()[0] + " " + line.split()[1]: r.stdout for line, r in results.items()}
    assert "support-m365" in by_start["mailbroker integration"]
    sent = results["mailbroker send --file events/message.json --wait"].stdout
    assert "status: sent" in sent and "reply: 250 2.0.0 OK" in sent
    assert "status: sent" in results["mailbroker status order-8812-confirmation"].stdout
    tested = results["mailbroker test support-m365 --to you@example.com --wait"].stdout
    assert re.search(r"✓ sent: the server answered 250 2\.0\.0 OK", tested), tested
    assert "access_token" in next(r.stdout for line, r in results.items() if line.endswith("/token"))
    assert not bundle.exists()  # the sandbox removed its files when it stopped
