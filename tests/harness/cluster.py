"""A whole Nebula on loopback for end-to-end tests: real etcd, the three control-plane services as
processes (`python -m nebula <svc> run`), engines as the agent's children running real vLLM.

With `restart_on_failure` the cluster does what the units' `Restart=on-failure` + `RestartSec=2` do under
systemd: a service that exits uncleanly (a crash, SIGKILL; see `crash()`) is started again 2 s later by a
keeper thread. `kill()` is an operator's stop and is never undone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.etcd import EtcdCluster, EtcdServer
from tests.harness.ports import free_port, free_port_range

SERVICES = ("gateway", "scheduler", "node")
RESTART_SEC = 2.0  # the units' RestartSec=


@dataclass
class NebulaCluster:
    workdir: Path
    etcd: EtcdServer | EtcdCluster
    vllm_venv: str
    node_grace_s: float = 30.0
    extra_nodes: tuple[str, ...] = ()
    """More node agents, each its own node (own name, config, port range, run dir): `node:<name>` in procs."""
    extra_config: str = ""
    """TOML appended to every node's config (whole sections, e.g. "[tracing]\notlp_endpoint = ...")."""
    extra_schedulers: int = 0
    """More schedulers (standbys while another leads): `scheduler:2`, `scheduler:3`, ... in procs."""
    restart_on_failure: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    """NEBULA_<SECTION>_<KEY> overrides for every process (e.g. NEBULA_NODE_HF_ENDPOINT)."""
    node_resync_s: float = 2.0
    engine_watchdog_s: float = 30.0
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    """Restarts the keeper did per service (what systemd counts as NRestarts)."""
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _keeper_stop: threading.Event = field(default_factory=threading.Event)
    _keeper: threading.Thread | None = None

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
        env.update(self.extra_env)
        return env

    def write_config(self) -> None:
        for svc in (*SERVICES, "engine_port"):
            self.ports[svc] = free_port()
        self.rewrite_config()

    def rewrite_config(self) -> None:
        """Write the config files again (same ports), e.g. after `etcd` changed; services read them at start."""
        self.config_path.write_text(self._config_text("node-a", 0))
        for i, name in enumerate(self.extra_nodes, start=1):
            (self.workdir / f"nebula-{name}.toml").write_text(self._config_text(name, i))

    def _config_text(self, node: str, index: int) -> str:
        engine_base = self.ports.setdefault(f"engines:{node}", free_port_range(20))
        node_port = self.ports["node"] if index == 0 else self.ports.setdefault(f"node:{node}", free_port())
        return f"""
[cluster]
etcd_endpoints = {json.dumps(list(self.etcd.endpoints))}
lease_ttl_s = 5

[gateway]
port = {self.ports['gateway']}
# The bootstrap key's files follow the config (none here: the test gateway stays open on loopback), so a
# host's /etc/nebula/admin.key.sha256 never closes it.
admin_key_file = "{self.workdir / 'admin.key'}"
admin_key_digest_file = "{self.workdir / 'admin.key.sha256'}"

[scheduler]
port = {self.ports['scheduler']}
node_grace_s = {self.node_grace_s}
resync_s = 2

[node]
name = "{node}"
port = {node_port}
port_min = {engine_base}
port_max = {engine_base + 19}
unit_backend = "process"
run_dir = "{self.node_run_dir(node)}"
state_dir = "{self.workdir / ('state' if index == 0 else f'state-{node}')}"
cache_dir = "{self.workdir / ('cache' if index == 0 else f'cache-{node}')}"
resync_s = {self.node_resync_s}

[engine]
# Engines as the test's own user: its files (workdir, models) are not another user's to read.
user = ""
vllm_venv = "{self.vllm_venv}"
vllm_device = "cpu"
default_max_model_len = 512
stop_timeout_s = 10
watchdog_s = {self.engine_watchdog_s}
""" + self.extra_config

    def start(self, svc: str) -> None:
        """`gateway`, `scheduler`, `node` (node-a), `node:<name>` for an extra node, `scheduler:<n>` for an
        extra scheduler."""
        kind, _, name = svc.partition(":")
        config = self.workdir / f"nebula-{name}.toml" if kind == "node" and name else None
        env = self.env(config)
        if kind == "scheduler" and name:
            env["NEBULA_SCHEDULER_PORT"] = str(self.ports.setdefault(svc, free_port()))
        with self._lock, (self.workdir / f"{svc.replace(':', '-')}.log").open("ab") as log:
            self.procs[svc] = subprocess.Popen([sys.executable, "-m", "nebula", kind, "run"], env=env,
                                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self, svc: str, sig: int = signal.SIGKILL) -> None:
        with self._lock:
            proc = self.procs.pop(svc)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def crash(self, svc: str, sig: int = signal.SIGKILL) -> int:
        """Signal `svc` as a crash would end it, leaving the restart to the keeper; its pid."""
        with self._lock:
            proc = self.procs[svc]
        proc.send_signal(sig)
        proc.wait(timeout=30)
        return proc.pid

    def pid(self, svc: str) -> int | None:
        """The pid of `svc` while it runs (None while it is down, e.g. waiting for its restart)."""
        with self._lock:
            proc = self.procs.get(svc)
            return proc.pid if proc is not None and proc.poll() is None else None

    def services(self) -> tuple[str, ...]:
        return (*SERVICES, *(f"node:{n}" for n in self.extra_nodes),
                *(f"scheduler:{i}" for i in range(2, 2 + self.extra_schedulers)))

    def up(self, timeout_s: float = 60) -> None:
        self.write_config()
        for svc in self.services():
            self.start(svc)
        if self.restart_on_failure:
            self._keeper = threading.Thread(target=self._keep, name="nebula-keeper", daemon=True)
            self._keeper.start()
        wait_until(lambda: http_ok(self.gateway_url + "/healthz"), timeout_s, "gateway healthy", self)
        # Every node agent registered: a model loaded before one has would be placed without it (no spread).
        wanted = {"node-a", *self.extra_nodes}
        wait_until(lambda: wanted <= self.registered_nodes(), timeout_s, f"node agents {sorted(wanted)} registered",
                   self)

    def registered_nodes(self) -> set[str]:
        """Names of the nodes whose agents hold a record in etcd (through the admin API)."""
        key = self.extra_env.get("NEBULA_ADMIN_KEY")
        request = urllib.request.Request(self.gateway_url + "/v1/admin/nodes",
                                         headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return {str(n["name"]) for n in json.load(resp)["data"]}
        except (OSError, ValueError, KeyError):
            return set()

    def _keep(self) -> None:
        """Restart=on-failure: restart a service RESTART_SEC after it exited uncleanly."""
        exited: dict[str, float] = {}
        while not self._keeper_stop.wait(0.1):
            with self._lock:
                for svc, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None or code == 0:
                        exited.pop(svc, None)
                        continue
                    since = exited.setdefault(svc, time.monotonic())
                    if time.monotonic() - since < RESTART_SEC:
                        continue
                    with (self.workdir / f"{svc.replace(':', '-')}.log").open("a") as log:
                        log.write(f"harness: {svc} exited with {code}; restarting it (Restart=on-failure)\n")
                    self.start(svc)
                    self.restarts[svc] = self.restarts.get(svc, 0) + 1
                    exited.pop(svc)

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
        self._keeper_stop.set()
        if self._keeper is not None:
            self._keeper.join(5)
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
def running_cluster(workdir: Path, etcd_dir: Path, *, etcd_members: int = 1, **kwargs: Any
                    ) -> Iterator[NebulaCluster]:
    """A cluster with its own etcd (`etcd_members` > 1: an etcd cluster of that many), up for the block, with
    every process and engine stopped after it."""
    venv = required_path("NEBULA_TEST_VLLM_VENV")
    etcd: EtcdServer | EtcdCluster = (EtcdCluster.launch(etcd_dir, size=etcd_members) if etcd_members > 1
                                      else EtcdServer.launch(etcd_dir))
    c = NebulaCluster(workdir=workdir, etcd=etcd, vllm_venv=venv, **kwargs)
    try:
        c.up()
        yield c
    finally:
        c.down()
        etcd.stop()


def post_json(url: str, body: bytes | Mapping[str, Any], timeout_s: float = 120,
              key: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST raw bytes or a JSON object (with `key` as the bearer token); the status and the parsed JSON
    answer, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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
