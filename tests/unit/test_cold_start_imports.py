"""Cold start: importing a handler loads only what every invocation needs, and touches no network.

Each handler is imported in a fresh interpreter set up as a Lambda execution environment sets it
up (``LAMBDA_TASK_ROOT``, the function name, so the Powertools Tracer is active as with
``Tracing: Active``; the handler's directory first on ``sys.path``, as ``/var/task`` is). An audit
hook records every socket operation that would reach the network while the import runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = sorted(p.parent.name for p in (ROOT / "functions").glob("*/app.py"))
LAZY = (
    "msal",
    "google.auth",
    "google.oauth2",
    "smtplib",
    "mailbroker.smtp.transport",
    "mailbroker.messages.models",
    "mailbroker.messages.mime",
    "aws_lambda_powertools.utilities.batch",
)

PROBE = """
import json, sys
network = []
def audit(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg"):
        network.append(event + " " + repr(args[1:])[:200])
sys.addaudithook(audit)
import app
print(json.dumps({"modules": sorted(sys.modules), "network": network}))
"""


@pytest.fixture(scope="module", params=HANDLERS)
def imported(request: pytest.FixtureRequest) -> dict[str, object]:
    task_root = ROOT / "functions" / request.param
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LAMBDA_TASK_ROOT": str(task_root),
        "AWS_LAMBDA_FUNCTION_NAME": f"mailbroker-{request.param}",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_SERVICE_NAME": "mailbroker",
        # The layer's package where Lambda puts a layer's python/ directory: after the task root.
        "PYTHONPATH": os.pathsep.join([str(task_root), str(ROOT / "layers" / "mailbroker")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=task_root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["handler"] = request.param
    return result


def test_importing_a_handler_leaves_token_and_smtp_libraries_unloaded(imported: dict[str, object]) -> None:
    # Given a fresh Lambda-like interpreter, when the handler module is imported,
    modules = set(imported["modules"])  # type: ignore[arg-type]

    # then MSAL, google-auth and the SMTP stack wait for the call that needs them.
    loaded = sorted(name for name in LAZY if name in modules)
    assert loaded == [], f"{imported['handler']} loads {loaded} at import"


def test_importing_a_handler_makes_no_network_call(imported: dict[str, object]) -> None:
    # Given a fresh Lambda-like interpreter with an audit hook on socket operations,
    # when the handler module is imported, then nothing resolved, connected or sent anything.
    assert imported["network"] == [], f"{imported['handler']} touches the network at import"
