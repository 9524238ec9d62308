"""`nebula up` / `nebula down` on one machine.

Where systemd is PID 1 the control plane runs as its units (`nebula.target`). Elsewhere (containers, CI,
this kind of dev box) `nebula supervise` runs the same commands as children: etcd when none answers,
then gateway, scheduler and the node agent, each restarted with backoff when it dies.
Engines are not its children: the agent starts them in their own sessions, so they outlive agent restarts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from nebula.adapters.timeouts import timeout
from nebula.core.config import NebulaConfig
from nebula.core.restarts import crash_backoff

log = logging.getLogger("nebula.launcher")
CONTROL_PLANE = ("gateway", "scheduler", "node")


def endpoint_answers(url: str, timeout_s: float = 0.5) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout_s):
            return True
    except OSError:
        return False


def etcd_command(cfg: NebulaConfig, data_dir: Path) -> list[str] | None:
    """The etcd to start for a one-machine cluster, or None when etcd is configured elsewhere or answers."""
    url = cfg.cluster.etcd_endpoints[0]
    host = urlsplit(url).hostname or ""
    if endpoint_answers(url) or host not in ("127.0.0.1", "localhost"):
        return None
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    port = urlsplit(url).port or 2379
    return [binary, "--name", "nebula", "--data-dir", str(data_dir),
            "--listen-client-urls", f"http://127.0.0.1:{port}", "--advertise-client-urls", f"http://127.0.0.1:{port}",
            "--listen-peer-urls", f"http://127.0.0.1:{port + 1}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{port + 1}",
            "--initial-cluster", f"nebula=http://127.0.0.1:{port + 1}",
            "--auto-compaction-retention", "1h"]


def clean_env(env: Mapping[str, str]) -> dict[str, str]:
    # etcd reads every ETCD_* variable as a flag; a stray one makes it refuse to start.
    return {k: v for k, v in env.items() if not k.startswith("ETCD_")}


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    backoff_s: float = 0.0
    started_at: float = field(default=0.0)

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env, stdout=out,
                                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            out.close()
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)


async def supervise(cfg: NebulaConfig, env: Mapping[str, str], state_dir: Path, log_dir: Path) -> int:
    """Run the control plane as children until SIGTERM; restart each one that dies, with backoff."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    child_env = clean_env(env)
    children: list[Child] = []
    etcd = etcd_command(cfg, state_dir / "etcd")
    if etcd:
        children.append(Child("etcd", etcd, child_env, log_dir / "etcd.log"))
    for svc in CONTROL_PLANE:
        children.append(Child(svc, [sys.executable, "-m", "nebula", svc, "run"], child_env, log_dir / f"{svc}.log"))
    for child in children:
        await child.start()
        if child.name == "etcd":
            await _wait_for(lambda: endpoint_answers(cfg.cluster.etcd_endpoints[0]), 30)
    while not stop.is_set():
        waits = {asyncio.create_task(c.proc.wait()): c for c in children if c.proc}
        stopper = asyncio.create_task(stop.wait())
        done, pending = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for t in done:
            if t is stopper:
                continue
            child = waits[t]
            # A child that ran a while restarts at once; one that crash-loops backs off to 30 s.
            child.backoff_s = crash_backoff(child.backoff_s, time.monotonic() - child.started_at, 0.5)
            log.warning("%s exited with %s; restarting in %.1f s", child.name, child.proc.returncode if child.proc
                        else "?", child.backoff_s)
            try:
                async with timeout(child.backoff_s):
                    await stop.wait()
            except TimeoutError:
                child.restarts += 1
                await child.start()
    for child in reversed(children):  # etcd last, so the others can deregister cleanly
        await _stop_child(child)
    return 0


async def _stop_child(child: Child, timeout_s: float = 15.0) -> None:
    if child.proc is None or child.proc.returncode is not None:
        return
    child.proc.terminate()
    try:
        async with timeout(timeout_s):
            await child.proc.wait()
    except TimeoutError:
        child.proc.kill()
        await child.proc.wait()
    log.info("stopped %s", child.name)


async def _wait_for(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.2)
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
