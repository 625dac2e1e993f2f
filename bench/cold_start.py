"""Figure 4: cold start.

Each handler's import time (``python -X importtime``, a fresh interpreter each time, the median of
several) divided by the import time of bare ``boto3`` measured in the same rounds. The processes
see what a Lambda execution environment sets (``LAMBDA_TASK_ROOT`` and the function's name, so the
Powertools Tracer is active as it is with ``Tracing: Active``), and the handler directory is first
on ``sys.path``, as ``/var/task`` is.

Also the Lambda layer's unzipped size, summed file by file, of what ``sam build`` builds: the
layer's own Makefile target (``layers/mailbroker/Makefile``, ``BuildMethod: makefile``) for
Lambda's platform (python3.13, manylinux2014 aarch64), the very command ``sam build`` runs. Goal:
25 MB (10^6 bytes).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from bench import Row, Target
from bench.environment import ROOT

FUNCTIONS = ROOT / "functions"
LAYER = ROOT / "layers" / "mailbroker"
MARKER = "--bench-import-starts--"
TARGET_RATIO = 1.25
LAYER_TARGET_MB = 25.0


def handlers() -> list[str]:
    """Every function directory with an app.py."""
    return sorted(p.parent.name for p in FUNCTIONS.glob("*/app.py"))


def lambda_env(function: str | None) -> dict[str, str]:
    task_root = str(FUNCTIONS / function) if function else str(ROOT)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "LAMBDA_TASK_ROOT": task_root,
        "AWS_LAMBDA_FUNCTION_NAME": f"mailbroker-{function or 'baseline'}",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_SERVICE_NAME": "mailbroker",
        "POWERTOOLS_METRICS_NAMESPACE": "Mailbroker",
        # The layer's package where Lambda puts a layer's python/ directory: after the task root.
        "PYTHONPATH": os.pathsep.join([task_root, str(LAYER)]),
    }


def import_ms(module: str, function: str | None = None) -> tuple[float, float]:
    """``import module`` in a fresh interpreter: the milliseconds ``-X importtime`` attributes to
    it (the cumulative time of every top-level import the statement triggered), and the CPU
    milliseconds the process spent on it (steadier than wall time on a shared machine)."""
    code = (
        f"import sys, time; sys.stderr.write({MARKER!r} + '\\n'); sys.stderr.flush(); "
        f"cpu = time.process_time(); import {module}; print((time.process_time() - cpu) * 1000)"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=lambda_env(function),
        cwd=FUNCTIONS / function if function else ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"import {module} failed:\n{done.stderr[-2000:]}")
    return _top_level_ms(done.stderr), float(done.stdout.strip().splitlines()[-1])


def _top_level_ms(stderr: str) -> float:
    lines = stderr.split(MARKER, 1)[1].splitlines()
    entries = []
    for line in lines:
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if not cumulative.strip().isdigit():
            continue  # the header line
        depth = len(name) - len(name.lstrip(" "))
        entries.append((depth, int(cumulative)))
    if not entries:
        raise RuntimeError("-X importtime printed nothing after the marker")
    top = min(depth for depth, _ in entries)
    return sum(us for depth, us in entries if depth == top) / 1000.0


def layer_size(*, zipped: bool = True) -> dict[str, Any]:
    """MB of the layer as ``sam build`` builds it (its Makefile target, for Lambda's arm64
    platform), unzipped, and zipped with deflate."""
    with tempfile.TemporaryDirectory(prefix="mailbroker-layer-") as tmp:
        subprocess.run(
            [
                "make",
                "--no-print-directory",
                "-C",
                str(LAYER),
                "build-MailbrokerLayer",
                f"ARTIFACTS_DIR={tmp}",
                f"PYTHON={sys.executable}",
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
        target = Path(tmp) / "python"
        files = [p for p in target.rglob("*") if p.is_file()]
        unzipped = sum(p.stat().st_size for p in files)
        sizes: dict[str, Any] = {"unzipped_mb": unzipped / 1e6, "unzipped_mib": unzipped / 2**20}
        if zipped:
            archive = Path(tmp) / "layer.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
                for path in files:
                    zf.write(path, path.relative_to(target.parent))
            sizes["zipped_mb"] = archive.stat().st_size / 1e6
        largest = sorted(
            ((sum(f.stat().st_size for f in d.rglob("*") if f.is_file()), d.name) for d in target.iterdir()),
            reverse=True,
        )[:6]
        sizes["largest_mb"] = {name: round(size / 1e6, 2) for size, name in largest}
        return sizes


def run(sandbox: object, *, smoke: bool) -> list[Row]:
    rounds = 1 if smoke else 7
    names = handlers()
    subjects = [("boto3", None)] + [("app", name) for name in names]
    if not smoke:
        for module, function in subjects:  # once untimed: byte-code caches written, files in page cache
            import_ms(module, function)
    samples: dict[str, list[float]] = {function or "boto3": [] for _, function in subjects}
    cpu: dict[str, list[float]] = {name: [] for name in samples}
    for _ in range(rounds):  # interleaved, so a noisy moment touches every subject alike
        for module, function in subjects:
            wall, used = import_ms(module, function)
            samples[function or "boto3"].append(wall)
            cpu[function or "boto3"].append(used)
    boto3_ms = statistics.median(samples["boto3"])
    boto3_cpu = statistics.median(cpu["boto3"])

    def cpu_ratio(values: list[float]) -> float | None:
        return round(statistics.median(values) / boto3_cpu, 2) if values else None

    rows = [
        Row(
            f"cold start: import {name} handler",
            statistics.median(samples[name]),
            boto3_ms,
            unit="ms",
            baseline_label="import boto3",
            target=Target(TARGET_RATIO, on="ratio"),
            details={
                "importtime_ms": [round(v, 1) for v in samples[name]],
                "boto3_importtime_ms": [round(v, 1) for v in samples["boto3"]],
                "cpu_ms": round(statistics.median(cpu[name]), 1),
                "boto3_cpu_ms": round(boto3_cpu, 1),
                "cpu_ratio": cpu_ratio(cpu[name]),
            },
        )
        for name in names
    ]
    size = layer_size(zipped=not smoke)
    rows.append(
        Row(
            "layer size, unzipped (sam build, arm64)",
            round(size["unzipped_mb"], 2),
            None,
            unit="MB",
            target=Target(LAYER_TARGET_MB),
            details={**size, "platform": "manylinux2014_aarch64", "python": "3.13"},
        )
    )
    return rows
