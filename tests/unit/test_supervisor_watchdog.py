"""The engine supervisor's own watchdog, for engines run as processes (no systemd WatchdogSec=): a hung engine
(SIGSTOP: it accepts connections and never answers) is killed once /health has failed for engine.watchdog_s, and
the supervisor exits ENGINE_FAILED so the agent restarts it. Under systemd the supervisor leaves that to systemd.
A real child process stands in for vLLM: a tiny HTTP server answering GET /health."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from nebula.adapters.processes import process_start_time
from nebula.adapters.sdnotify import Notifier
from nebula.core.config import EngineConfig
from nebula.core.engine_spec import EngineSpec
from nebula.services.engine.supervisor import EngineSupervisor, ExitCode
from tests.harness.ports import free_port

pytestmark = pytest.mark.timeout(60)

FAKE_VLLM = """\
import http.server, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
with open(os.environ["FAKE_VLLM_PID_FILE"], "w") as f:
    f.write(str(os.getpid()))

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


async def _run_until_hung(tmp_path: Path, notifier_env: dict[str, str], give_up_s: float
                          ) -> tuple[asyncio.Task[int], int]:
    """Start a supervisor over the fake vLLM, wait until it serves, SIGSTOP it; the supervisor's task and pid."""
    task, pid = await _serving(tmp_path, notifier_env)
    os.kill(pid, signal.SIGSTOP)
    await asyncio.wait({task}, timeout=give_up_s)
    return task, pid


async def _serving(tmp_path: Path, notifier_env: dict[str, str], prelude: str = ""
                   ) -> tuple[asyncio.Task[int], int]:
    """A supervisor over the fake vLLM (`prelude` runs first in it), once it serves: its task and the engine's pid."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    script = venv / "bin" / "vllm"
    script.write_text(f"#!{sys.executable}\n{prelude}{FAKE_VLLM}")
    script.chmod(0o755)
    pid_file = tmp_path / "vllm.pid"
    spec = EngineSpec(instance="hang", model="m", source=str(tmp_path), port=free_port())
    cfg = EngineConfig(vllm_venv=str(venv), health_interval_s=0.2, health_timeout_s=0.2, watchdog_s=1.0,
                       stop_timeout_s=1.0)
    env = {**os.environ, "FAKE_VLLM_PID_FILE": str(pid_file)}
    supervisor = EngineSupervisor(spec, cfg, Notifier(notifier_env), env, cpu=False)
    task = asyncio.create_task(supervisor.run())
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        await asyncio.sleep(0.05)
    pid = int(pid_file.read_text())
    await asyncio.sleep(1.0)  # past the startup: the supervisor saw /health answer and watches it
    assert not task.done()
    return task, pid


async def test_a_hung_engine_is_killed_without_systemd(tmp_path: Path) -> None:
    task, pid = await _run_until_hung(tmp_path, {}, give_up_s=10.0)
    try:
        assert task.done(), "the supervisor kept a hung engine"
        assert task.result() is ExitCode.ENGINE_FAILED
        assert process_start_time(pid) is None, "the hung engine is still there"
    finally:
        _kill(pid)


async def test_under_systemd_the_watchdog_is_left_to_systemd(tmp_path: Path) -> None:
    # WATCHDOG_USEC set: systemd watches (it would kill the unit); the supervisor only withholds WATCHDOG=1.
    task, pid = await _run_until_hung(tmp_path, {"WATCHDOG_USEC": "60000000"}, give_up_s=2.5)
    try:
        assert not task.done()
        assert process_start_time(pid) is not None
    finally:
        _kill(pid)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_engine_that_ignores_sigterm_is_killed_after_the_stop_timeout(tmp_path: Path) -> None:
    """engine.stop_timeout_s bounds the drain: an engine still running that long after its SIGTERM is killed, and
    the stop is still a clean one."""
    task, pid = await _serving(tmp_path, {}, prelude="import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n")
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # as systemd's stop: the supervisor's handler drains the engine
        await asyncio.sleep(0.5)
        assert process_start_time(pid) is not None, "the engine should have ignored its SIGTERM"
        await asyncio.wait({task}, timeout=10.0)  # stop_timeout_s is 1 s
        assert task.done(), "the supervisor waits for ever on an engine that ignores SIGTERM"
        assert task.result() is ExitCode.OK
        assert process_start_time(pid) is None, "the engine is still there"
    finally:
        _kill(pid)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)

