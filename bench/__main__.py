"""``python -m bench [--smoke] [--json PATH] [--only FIGURE ...]``: run the figures, print one table.

Exit status 0 when every figure ran (a missed target is a result, not a failure), 1 when a figure
could not be measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

from bench import Row, table
from bench.environment import Sandbox

FIGURES = (
    "token_calls",
    "smtp_round_trips",
    "warm_sessions",
    "connections",
    "http_transports",
    "cold_start",
    "throughput",
    "latency",
    "cache_hit",
    "mime_build",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every figure")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", action="append", choices=FIGURES, metavar="FIGURE", help=", ".join(FIGURES))
    args = parser.parse_args(argv)
    # The handlers run with metrics disabled; Powertools still warns that nothing was published.
    warnings.filterwarnings("ignore", message="No application metrics to publish")

    rows: list[Row] = []
    failed: list[str] = []
    timings: dict[str, float] = {}
    with Sandbox() as sandbox:
        for name in args.only or FIGURES:
            started = time.monotonic()
            print(f"bench: {name} …", file=sys.stderr, flush=True)
            try:
                module = importlib.import_module(f"bench.{name}")
                rows.extend(module.run(sandbox, smoke=args.smoke))
            except Exception:
                failed.append(name)
                traceback.print_exc()
            timings[name] = round(time.monotonic() - started, 1)
            print(f"bench: {name} done in {timings[name]} s", file=sys.stderr, flush=True)

    print()
    print(table(rows))
    if failed:
        print(f"\nnot measured (errors above): {', '.join(failed)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "smoke": args.smoke,
                    "python": sys.version.split()[0],
                    "machine": platform.machine(),
                    "cpus": _cpus(),
                    "seconds": timings,
                    "failed": failed,
                    "rows": [row.as_dict() for row in rows],
                },
                indent=2,
            )
        )
    return 1 if failed else 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
