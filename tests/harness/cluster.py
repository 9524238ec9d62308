"""A whole Nebula on loopback for end-to-end tests: real etcd, the three control-plane services as
processes (`python -m nebula <svc> run`), engines as the agent's children running real vLLM."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.etcd import EtcdServer, free_port, port_is_free

SERVICES = ("gateway", "scheduler", "node")


@dataclass
class NebulaCluster:
    workdir: Path
    etcd: EtcdServer
    vllm_venv: str
    node_grace_s: float = 30.0
    extra_nodes: tuple[str, ...] = ()
    """More node agents, each its own node (own name, config, port range, run dir): `node:<name>` in procs."""
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

    def node_run_dir(self, node: str) -> Path:
        return self.run_dir if node == "node-a" else self.workdir / f"run-{node}"

    def env(self, config: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NEBULA_", "ETCD_"))}
        env["NEBULA_CONFIG"] = str(config or self.config_path)
        env["NEBULA_URL"] = self.gateway_url
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def write_config(self) -> None:
        for svc in (*SERVICES, "engine_port"):
            self.ports[svc] = free_port()
        self.config_path.write_text(self._config_text("node-a", 0))
        for i, name in enumerate(self.extra_nodes, start=1):
            (self.workdir / f"nebula-{name}.toml").write_text(self._config_text(name, i))

    def _config_text(self, node: str, index: int) -> str:
        engine_base = free_port_range(20)
        return f"""
[cluster]
etcd_endpoints = ["{self.etcd.endpoint}"]
lease_ttl_s = 5

[gateway]
port = {self.ports['gateway']}

[scheduler]
port = {self.ports['scheduler']}
node_grace_s = {self.node_grace_s}
resync_s = 2

[node]
name = "{node}"
port = {self.ports['node'] if index == 0 else free_port()}
port_min = {engine_base}
port_max = {engine_base + 19}
unit_backend = "process"
run_dir = "{self.node_run_dir(node)}"
state_dir = "{self.workdir / ('state' if index == 0 else f'state-{node}')}"
resync_s = 2

[engine]
vllm_venv = "{self.vllm_venv}"
vllm_device = "cpu"
default_max_model_len = 512
stop_timeout_s = 10
"""

    def start(self, svc: str) -> None:
        """`gateway`, `scheduler`, `node` (node-a), or `node:<name>` for an extra node."""
        kind, _, node = svc.partition(":")
        config = self.workdir / f"nebula-{node}.toml" if node else None
        log = (self.workdir / f"{svc.replace(':', '-')}.log").open("ab")
        self.procs[svc] = subprocess.Popen([sys.executable, "-m", "nebula", kind, "run"], env=self.env(config),
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def kill(self, svc: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(svc)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def up(self, timeout_s: float = 60) -> None:
        self.write_config()
        for svc in (*SERVICES, *(f"node:{n}" for n in self.extra_nodes)):
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

    def engine_pids(self, node: str = "node-a") -> dict[str, int]:
        out = {}
        for f in (self.node_run_dir(node) / "pids").glob("*.pid"):
            out[f.stem] = int(json.loads(f.read_text())["pid"])
        return out

    def all_engine_pids(self) -> list[int]:
        return [pid for node in ("node-a", *self.extra_nodes) for pid in self.engine_pids(node).values()]

    def logs(self) -> str:
        parts = []
        for f in sorted(self.workdir.rglob("*.log")):
            parts.append(f"==> {f} <==\n" + f.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def down(self) -> None:
        for svc in reversed(list(self.procs)):
            self.kill(svc, signal.SIGTERM)
        for pid in self.all_engine_pids():
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in self.all_engine_pids()):
            time.sleep(0.3)
        for pid in self.all_engine_pids():
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


@contextmanager
def running_cluster(workdir: Path, etcd_dir: Path, **kwargs: Any) -> Iterator[NebulaCluster]:
    """A cluster with its own etcd, up for the block, with every process and engine stopped after it."""
    venv = required_path("NEBULA_TEST_VLLM_VENV")
    etcd = EtcdServer.launch(etcd_dir)
    c = NebulaCluster(workdir=workdir, etcd=etcd, vllm_venv=venv, **kwargs)
    try:
        c.up()
        yield c
    finally:
        c.down()
        etcd.stop()


def post_json(url: str, body: bytes | Mapping[str, Any], timeout_s: float = 120) -> tuple[int, dict[str, Any]]:
    """POST raw bytes or a JSON object; the status and the parsed JSON answer, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def free_port_range(size: int) -> int:
    """The first of `size` free consecutive ports below the ephemeral range (clients cannot take them meanwhile),
    at a random place so that clusters of one test session do not collide."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - size)
        if all(port_is_free(base + i) for i in range(size)):
            return base
    raise RuntimeError(f"no {size} free consecutive ports in 20000-32000")


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
