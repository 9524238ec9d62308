"""ProcessEngineUnits with a harmless fake `nebula engine run <instance>`: real processes, pid files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from nebula.adapters.processes import ProcessEngineUnits, process_start_time
from nebula.core.units import UnitState, UnitStatus

MakeUnits = Callable[..., ProcessEngineUnits]

# Behaves by instance name: "fail-N" exits N at once, "stubborn" ignores SIGTERM, "forker" first starts a child
# of its own (as the supervisor starts vLLM) and prints its pid, others run until SIGTERM and then "drain" for
# 0.5 s, like vLLM finishing its requests.
FAKE_ENGINE = """\
import os, signal, subprocess, sys, time
assert sys.argv[1:3] == ["engine", "run"], sys.argv
instance = sys.argv[3]
if instance.startswith("fail-"):
    sys.exit(int(instance.split("-", 1)[1]))
if instance == "forker":
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(f"worker pid {worker.pid}", flush=True)
if instance == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.5), sys.exit(0)))
print(f"fake engine {instance} pid {os.getpid()} ready", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def fake_argv(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_nebula.py"
    script.write_text(FAKE_ENGINE)
    return [sys.executable, str(script)]


@pytest.fixture
async def make_units(tmp_path: Path, fake_argv: list[str]) -> AsyncIterator[MakeUnits]:
    made: list[ProcessEngineUnits] = []

    def make(stop_timeout_s: float = 5.0) -> ProcessEngineUnits:
        units = ProcessEngineUnits(fake_argv, tmp_path / "run", tmp_path / "log", dict(os.environ),
                                   stop_timeout_s=stop_timeout_s)
        made.append(units)
        return units

    yield make
    for units in made:
        await units.close()
    # Whatever a failing test left running: kill it by the pids recorded (our own children only).
    for pid_file in (tmp_path / "run" / "pids").glob("*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError, OSError):
            os.killpg(json.loads(pid_file.read_text())["pid"], signal.SIGKILL)


async def wait_for(units: ProcessEngineUnits, instance: str, state: UnitState | None,
                   timeout_s: float = 10.0) -> UnitStatus | None:
    """Poll list() until `instance` is in `state` (None: absent); returns its status."""
    status: UnitStatus | None = None
    for _ in range(int(timeout_s / 0.05)):
        status = (await units.list()).get(instance)
        if (status is None and state is None) or (status is not None and status.state is state):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"{instance} never reached {state}; last {status}")


def _says_ready(log: Path) -> bool:
    return log.is_file() and "ready" in log.read_text()


async def wait_ready(log: Path, timeout_s: float = 10.0) -> None:
    """The fake prints once its SIGTERM handler is in place; a signal before that would just kill it."""
    for _ in range(int(timeout_s / 0.05)):
        if _says_ready(log):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{log}: fake engine never got ready")


async def test_start_list_readopt_stop(make_units: MakeUnits, tmp_path: Path) -> None:
    units = make_units()
    await units.start("qwen")
    status = await wait_for(units, "qwen", UnitState.ACTIVE)
    assert status is not None
    pid = status.main_pid
    assert process_start_time(pid) is not None
    # Its own session: a Ctrl-C or an agent restart does not signal it.
    assert os.getsid(pid) == pid
    await wait_ready(tmp_path / "log" / "qwen.log")
    await units.start("qwen")  # already running: no second engine
    assert (await units.list())["qwen"].main_pid == pid

    # A restarted agent (a new instance, no children of its own) finds the running engine.
    again = make_units()
    adopted = (await again.list())["qwen"]
    assert (adopted.state, adopted.main_pid) == (UnitState.ACTIVE, pid)

    await again.stop("qwen")
    assert (await again.list())["qwen"].state is UnitState.DEACTIVATING  # stop returns before the exit
    await again.wait_stopped("qwen")
    assert await again.list() == {}
    assert await units.list() == {}
    assert process_start_time(pid) is None
    log = (tmp_path / "log" / "qwen.log").read_text()
    assert log.count(f"fake engine qwen pid {pid} ready") == 1


async def test_failed_exit_is_reported_with_its_status_until_reset(
        make_units: MakeUnits) -> None:
    units = make_units()
    await units.start("fail-7")
    status = await wait_for(units, "fail-7", UnitState.FAILED)
    assert status is not None
    assert status.result == "exit-code:7"
    # Still failed for a restarted agent: the exit status was written down.
    assert (await make_units().list())["fail-7"].result == "exit-code:7"
    await units.reset("fail-7")
    assert await units.list() == {}


async def test_stop_escalates_to_sigkill(make_units: MakeUnits, tmp_path: Path) -> None:
    units = make_units(stop_timeout_s=0.5)
    await units.start("stubborn")
    status = await wait_for(units, "stubborn", UnitState.ACTIVE)
    assert status is not None
    await wait_ready(tmp_path / "log" / "stubborn.log")
    await units.stop("stubborn")
    await units.wait_stopped("stubborn")
    assert process_start_time(status.main_pid) is None
    assert await units.list() == {}


@pytest.mark.parametrize("readopted", [False, True])
async def test_what_a_dead_engine_leaves_behind_is_killed(make_units: MakeUnits, tmp_path: Path,
                                                          readopted: bool) -> None:
    """A killed supervisor leaves vLLM running (holding its port and memory): like systemd with a unit's
    cgroup, the back-end kills the rest of the engine's process group once its main process is gone."""
    units = make_units()
    await units.start("forker")
    status = await wait_for(units, "forker", UnitState.ACTIVE)
    assert status is not None
    log = tmp_path / "log" / "forker.log"
    await wait_ready(log)
    worker = int(log.read_text().split("worker pid ")[1].split()[0])
    assert process_start_time(worker) is not None
    if readopted:  # the agent that started it is gone; a new one finds the engine by its pid file
        units = make_units()
    os.kill(status.main_pid, signal.SIGKILL)
    failed = await wait_for(units, "forker", UnitState.FAILED)
    assert failed is not None
    assert failed.result == ("exited" if readopted else "signal:9")
    for _ in range(100):
        if process_start_time(worker) is None:
            break
        await asyncio.sleep(0.05)
    assert process_start_time(worker) is None, "the engine's child outlived it"


async def test_a_death_seen_between_the_two_looks_keeps_its_exit_status(
        make_units: MakeUnits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """list() looks at an engine twice (reaping its children, then each instance's liveness). An engine that
    dies between the two looks is the losing interleaving that once flaked the test above ('exited' where
    'signal:9' was due): forced here by a first poll that does not see the death yet."""
    units = make_units()
    await units.start("forker")
    status = await wait_for(units, "forker", UnitState.ACTIVE)
    assert status is not None
    await wait_ready(tmp_path / "log" / "forker.log")
    os.kill(status.main_pid, signal.SIGKILL)
    for _ in range(200):  # until it is a zombie: dead, its status not yet collected
        if process_start_time(status.main_pid) is None:
            break
        await asyncio.sleep(0.01)
    real_poll = subprocess.Popen.poll
    missed: list[int] = []

    def poll_missing_the_death_once(self: subprocess.Popen[bytes]) -> int | None:
        if self.pid == status.main_pid and not missed:
            missed.append(self.pid)
            return None
        return real_poll(self)

    monkeypatch.setattr(subprocess.Popen, "poll", poll_missing_the_death_once)
    failed = (await units.list())["forker"]
    assert missed, "the first look did not happen"
    assert (failed.state, failed.result) == (UnitState.FAILED, "signal:9")


async def test_recycled_pid_is_not_mistaken_for_the_engine(
        make_units: MakeUnits, tmp_path: Path) -> None:
    pids = tmp_path / "run" / "pids"
    pids.mkdir(parents=True)
    # Our own pid is alive, but its start time differs: the engine that had this pid is gone.
    own_start = process_start_time(os.getpid())
    assert own_start is not None
    (pids / "ghost.pid").write_text(json.dumps({"pid": os.getpid(), "start_time": own_start + 1}))
    status = (await make_units().list())["ghost"]
    assert (status.state, status.result) == (UnitState.FAILED, "exited")


async def test_stop_of_unknown_instance_is_a_no_op(make_units: MakeUnits) -> None:
    units = make_units()
    await units.stop("nothing")
    await units.reset("nothing")
    assert await units.list() == {}
