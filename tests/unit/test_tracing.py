"""X-Ray patches botocore when the first AWS client is built and requests when a token provider
is — nothing at import, and nothing else. Run in a fresh interpreter set up as Lambda sets one up,
so the Tracer is active."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
sys.path.insert(0, "functions/sender")
import app  # the sender handler: Tracer built, nothing patched yet
import aws_xray_sdk.core.patcher as patcher
after_import = sorted(patcher._PATCHED_MODULES)
from mailbroker import runtime
runtime.aws_client("sqs")
after_client = sorted(patcher._PATCHED_MODULES)
from mailbroker.tokens.providers import TokenProviders
TokenProviders()
print(json.dumps([after_import, after_client, sorted(patcher._PATCHED_MODULES)]))
"""


def test_xray_patches_each_library_on_first_use_only():
    env = {
        **os.environ,
        "AWS_LAMBDA_FUNCTION_NAME": "mailbroker-sender",
        "LAMBDA_TASK_ROOT": str(ROOT / "functions" / "sender"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR",
        "POWERTOOLS_TRACE_DISABLED": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    after_import, after_client, after_provider = json.loads(done.stdout.strip().splitlines()[-1])

    assert after_import == []
    assert after_client == ["botocore"]
    assert after_provider == ["botocore", "requests"]
