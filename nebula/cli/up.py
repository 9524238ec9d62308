"""`nebula up` / `nebula down` / `nebula supervise`: a whole Nebula on this machine."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from nebula.cli.bootstrap_key import ensure_admin_key
from nebula.cli.client import CliError, gateway_url
from nebula.core.config import NebulaConfig
from nebula.services.launcher import pid_alive, supervise

LOG_DIR = Path("/var/log/nebula")


def _pidfile(cfg: NebulaConfig) -> Path:
    return Path(cfg.node.run_dir) / "supervise.pid"


def _systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def _running_pid(cfg: NebulaConfig) -> int | None:
    try:
        pid = int(_pidfile(cfg).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _gateway_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def up(cfg: NebulaConfig, env: dict[str, str]) -> int:
    url = gateway_url(cfg, env)
    # Before the gateway starts: it reads the digest once, at start, and a gateway without it is open.
    made = ensure_admin_key(cfg.gateway)
    if made:
        print(f"{made}; a gateway already running takes it at its next restart")
    if _systemd():
        subprocess.run(["systemctl", "start", "nebula.target"], check=True)
    elif (pid := _running_pid(cfg)) is not None:
        print(f"nebula is already up (supervisor pid {pid})")
    else:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with (LOG_DIR / "supervise.log").open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "nebula", "supervise"], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        print(f"nebula control plane starting (supervisor pid {proc.pid}, logs in {LOG_DIR})")
    deadline = time.monotonic() + 90
    while not _gateway_healthy(url):
        if time.monotonic() > deadline:
            raise CliError(f"the gateway did not answer at {url} within 90 s; see {LOG_DIR}/*.log", 3)
        time.sleep(0.3)
    print(f"nebula is up: gateway at {url}")
    return 0


def down(cfg: NebulaConfig, env: dict[str, str]) -> int:
    if _systemd():
        subprocess.run(["systemctl", "stop", "nebula.target"], check=True)
        return 0
    pid = _running_pid(cfg)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    stopped = asyncio.run(_stop_engines(cfg, env))
    print(f"nebula is down ({stopped} engine(s) stopped)")
    return 0


async def _stop_engines(cfg: NebulaConfig, env: dict[str, str]) -> int:
    from nebula.core.units import UnitState
    from nebula.services.agent.main import process_units

    units = process_units(cfg, env)
    running = [i for i, u in (await units.list()).items() if u.state is not UnitState.INACTIVE]
    for inst in running:
        await units.stop(inst)
    deadline = time.monotonic() + cfg.engine.stop_timeout_s + 10
    while time.monotonic() < deadline:
        live = [i for i, u in (await units.list()).items()
                if u.state in (UnitState.ACTIVE, UnitState.ACTIVATING, UnitState.DEACTIVATING)]
        if not live:
            break
        await asyncio.sleep(0.3)
    await units.close()
    return len(running)


def supervise_cmd(cfg: NebulaConfig, env: dict[str, str]) -> int:
    from nebula.services.logsetup import setup_logging

    setup_logging("supervise", cfg.log.level, env)
    pidfile = _pidfile(cfg)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(str(os.getpid()))
    try:
        return asyncio.run(supervise(cfg, env, Path(cfg.node.state_dir), LOG_DIR))
    finally:
        pidfile.unlink(missing_ok=True)
