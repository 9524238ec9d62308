"""A whole Nebula on loopback for end-to-end tests: real etcd, the three control-plane services as
processes (`python -m nebula <svc> run`), engines as the agent's children running real vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.etcd import EtcdServer, free_port

SERVICES = ("gateway", "scheduler", "node")


@dataclass
class NebulaCluster:
    workdir: Path
    etcd: EtcdServer
    vllm_venv: str
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.workdir / "nebula.toml"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NEBULA_", "ETCD_"))}
        env["NEBULA_CONFIG"] = str(self.config_path)
        env["NEBULA_URL"] = self.gateway_url
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def write_config(self) -> None:
        for svc in (*SERVICES, "engine_port"):
            self.ports[svc] = free_port()
        engine_base = 20000 + (os.getpid() % 200) * 50
        self.config_path.write_text(f"""
[cluster]
etcd_endpoints = ["{self.etcd.endpoint}"]
lease_ttl_s = 5

[gateway]
port = {self.ports['gateway']}

[scheduler]
port = {self.ports['scheduler']}
node_grace_s = 30
resync_s = 2

[node]
name = "node-a"
port = {self.ports['node']}
port_min = {engine_base}
port_max = {engine_base + 49}
unit_backend = "process"
run_dir = "{self.run_dir}"
state_dir = "{self.workdir / 'state'}"
resync_s = 2

[engine]
vllm_venv = "{self.vllm_venv}"
vllm_device = "cpu"
default_max_model_len = 512
stop_timeout_s = 10
""")

    def start(self, svc: str) -> None:
        log = (self.workdir / f"{svc}.log").open("ab")
        self.procs[svc] = subprocess.Popen([sys.executable, "-m", "nebula", svc, "run"], env=self.env(),
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def kill(self, svc: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(svc)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def up(self, timeout_s: float = 60) -> None:
        self.write_config()
        for svc in SERVICES:
            self.start(svc)
        wait_until(lambda: http_ok(self.gateway_url + "/healthz"), timeout_s, "gateway healthy", self)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "nebula", *args], env=self.env(), capture_output=True,
                             text=True, timeout=120)
        if check and res.returncode != 0:
            raise AssertionError(f"nebula {' '.join(args)} -> {res.returncode}: {res.stderr}{res.stdout}")
        return res

    def models(self) -> Any:
        return json.loads(self.cli("list", "--json").stdout)

    def engine_pids(self) -> dict[str, int]:
        out = {}
        for f in (self.run_dir / "pids").glob("*.pid"):
            out[f.stem] = int(json.loads(f.read_text())["pid"])
        return out

    def logs(self) -> str:
        parts = []
        for f in sorted(self.workdir.rglob("*.log")):
            parts.append(f"==> {f} <==\n" + f.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def down(self) -> None:
        for svc in reversed(SERVICES):
            if svc in self.procs:
                self.kill(svc, signal.SIGTERM)
        for pid in self.engine_pids().values():
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in self.engine_pids().values()):
            time.sleep(0.3)
        for pid in self.engine_pids().values():
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours is not alive
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return False


def required_path(name: str) -> str:
    """The path in environment variable `name`; the test fails (never skips) when it is missing."""
    import pytest

    value = os.environ.get(name, "")
    if not value or not Path(value).exists():
        pytest.fail(f"{name} must point at an existing path (scripts/test.sh sets it up); got {value!r}")
    return value


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_until(check: Any, timeout_s: float, what: str, cluster: NebulaCluster | None = None,
               interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    detail = cluster.logs() if cluster else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{detail}")
