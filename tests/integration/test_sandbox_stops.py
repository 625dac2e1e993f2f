"""The sandbox stops everything it started: ``mailbroker local`` and ``make run`` end their moto
server, servers and threads and remove their temporary files on SIGINT and SIGTERM, also when
started in the background from a script (SIGINT ignored from the start); and moto never outlives
its owner, even one killed outright.

Each command runs in its own process group with ``TMPDIR`` pointing at the test's own directory,
so "nothing left behind" is checked by looking at that directory and at ``/proc``.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.fixtures.processes import Child, alive, child, printed_json, sandbox_env, wait_for

MOTO = "mailbroker_sandbox.moto_atomic"
LOCAL = [sys.executable, "-m", "mailbroker_cli.main", "local", "--json"]
RUN = [sys.executable, "-m", "mailbroker_sandbox.run"]


def moto_of(command: Child) -> int:
    (pid,) = wait_for(lambda: command.descendants(MOTO), 10, "the moto server among its children")
    return pid


def left_behind(tmp: Path) -> list[str]:
    return sorted(str(path.relative_to(tmp)) for path in tmp.rglob("*"))


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("signum", "ignore_sigint"),
    [
        pytest.param(signal.SIGTERM, False, id="SIGTERM"),
        pytest.param(signal.SIGINT, True, id="SIGINT-started-in-the-background"),
    ],
)
def test_local_stops_its_moto_server_and_removes_its_files_on_a_signal(tmp_path, signum, ignore_sigint):
    with child(LOCAL, env=sandbox_env(tmp_path), ignore_sigint=ignore_sigint) as local:
        info = local.read_until(printed_json, 90, "ready line")
        moto = moto_of(local)
        workdir = Path(info["workdir"])
        assert workdir.is_dir() and workdir.parent == tmp_path

        local.signal(signum)
        code = local.wait(60)

        assert code == 0, local.stderr()[-3000:]
        assert not alive(moto)
        assert not workdir.exists()
        assert left_behind(tmp_path) == []


@pytest.mark.timeout(180)
def test_moto_exits_when_the_sandbox_that_started_it_is_killed_outright(tmp_path):
    with child(LOCAL, env=sandbox_env(tmp_path)) as local:
        local.read_until(printed_json, 90, "ready line")
        moto = moto_of(local)

        local.signal(signal.SIGKILL)
        local.wait(10)

        wait_for(lambda: not alive(moto), 20, "moto to exit after its owner died")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("signum", "ignore_sigint"),
    [
        pytest.param(signal.SIGTERM, False, id="SIGTERM"),
        pytest.param(signal.SIGINT, True, id="SIGINT-started-in-the-background"),
    ],
)
def test_make_run_stops_everything_and_keeps_only_its_function_log_on_a_signal(
    tmp_path, signum, ignore_sigint
):
    with child(RUN, env=sandbox_env(tmp_path), ignore_sigint=ignore_sigint) as run:
        run.read_until(lambda out: "moto server" in out, 90, "the started moto server")
        moto = moto_of(run)

        run.signal(signum)
        code = run.wait(60)

        assert code == 128 + signum, run.output[-3000:] + run.stderr()[-3000:]
        assert "everything started was stopped" in run.stderr()
        assert not alive(moto)
        (log_dir,) = [path for path in tmp_path.iterdir() if path.name.startswith("mailbroker-run-")]
        assert left_behind(tmp_path) == [log_dir.name, f"{log_dir.name}/functions.log"]
