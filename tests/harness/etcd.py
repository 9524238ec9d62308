"""Real etcd for integration tests: free loopback ports, own data dirs.

`EtcdServer` is one member (a single-member cluster unless it is part of an `EtcdCluster`, which runs
several members that elect a leader among themselves). The process is exec'd directly (no shell), so
`pid` is etcd's own and signals reach it. Every `ETCD_*` variable is stripped from its environment because
etcd reads each one as a flag. `restart()` keeps the data dir and ports, which is what a systemd restart of
etcd looks like.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from tests.harness.ports import free_port, port_is_free

_HEALTH_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
_START_ATTEMPTS = 3


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}


class EtcdServer:
    """Use `EtcdServer.launch(workdir)`; then `.endpoint`, `stop()`, `start()`, `restart()`, `kill()`,
    `pause()` (SIGSTOP: accepts TCP, never answers) and `resume()`."""

    def __init__(self, workdir: Path, *, client_port: int, peer_port: int, binary: str = "etcd",
                 name: str = "test", initial_cluster: str = "", cluster_state: str = "new") -> None:
        """`initial_cluster` ("name=peer-url,...") makes this a member of a larger cluster; empty: alone.
        `cluster_state` "existing" joins a running cluster that already added this member."""
        self.workdir = workdir
        self.name = name
        self.initial_cluster = initial_cluster
        self.cluster_state = cluster_state
        self.data_dir = workdir / "data"
        self.log_path = workdir / "etcd.log"
        self.client_port = client_port
        self.peer_port = peer_port
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def launch(cls, workdir: Path, *, binary: str = "etcd") -> EtcdServer:
        """Start on fresh free ports, retrying with new ones if another job grabbed them meanwhile."""
        resolved = shutil.which(binary)
        if resolved is None:
            raise RuntimeError(f"etcd binary {binary!r} not found on PATH")
        last: Exception | None = None
        for attempt in range(_START_ATTEMPTS):
            server = cls(
                workdir / f"try{attempt}", client_port=free_port(), peer_port=free_port(), binary=resolved
            )
            try:
                server.start()
                return server
            except RuntimeError as exc:
                last = exc
                server.kill()
        raise RuntimeError(f"etcd did not start after {_START_ATTEMPTS} attempts: {last}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The client URLs to configure services with (one here; several for an `EtcdCluster`)."""
        return (self.endpoint,)

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("etcd is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        peer = self.peer_url
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--initial-cluster-state", self.cluster_state,
        ]  # fmt: skip

    def start(self, *, wait: bool = True) -> None:
        """Start on the same data dir and ports; `wait=False` returns before it is healthy (a member of a
        cluster is healthy only once a quorum of members runs)."""
        if self.running:
            raise RuntimeError("etcd already running")
        for port in (self.client_port, self.peer_port):
            if not port_is_free(port):
                raise RuntimeError(f"port {port} is taken")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self._argv(),
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C on pytest must not reach etcd before our teardown does
        )
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = _HEALTH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited at start; see {self.log_path}")
            if self._healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd not healthy after {timeout}s; see {self.log_path}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=0.5) as response:
                return b'"true"' in response.read()
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM and wait (etcd flushes and exits in about a second)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)  # a paused etcd cannot handle SIGTERM
            self._proc.terminate()
            try:
                self._proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reap()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._reap()

    def restart(self) -> None:
        """Stop and start again on the same data dir and ports."""
        self.stop()
        self.start()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def _reap(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def etcd_call(endpoint: str, path: str, body: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """POST to etcd's JSON gateway (`/v3/...`); the decoded answer. Raises OSError when it does not answer."""
    req = urllib.request.Request(f"{endpoint}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def etcd_get(endpoints: Sequence[str], key: str) -> dict[str, Any] | None:
    """The record of `key` ({"key": str, "value": bytes, "lease": int, "create_revision": int, ...}) from the
    first endpoint that answers; None when the key does not exist."""
    kvs = etcd_list(endpoints, key, prefix=False)
    return kvs[0] if kvs else None


def etcd_list(endpoints: Sequence[str], key: str, *, prefix: bool = True) -> list[dict[str, Any]]:
    """The records under `key` (a prefix; or only `key` itself), from the first endpoint that answers;
    raises OSError when none does."""
    body = {"key": _b64(key.encode())}
    if prefix:
        body["range_end"] = _b64(key[:-1].encode() + bytes([ord(key[-1]) + 1]))
    last: OSError | None = None
    for endpoint in endpoints:
        try:
            kvs = etcd_call(endpoint, "/v3/kv/range", body).get("kvs", [])
        except OSError as e:
            last = e
            continue
        out = []
        for raw in kvs:
            kv = dict(raw)
            # surrogateescape: a key that is not UTF-8 (the chaos suite writes some) reads back as one
            kv["key"] = base64.b64decode(kv["key"]).decode("utf-8", "surrogateescape")
            kv["value"] = base64.b64decode(kv.get("value", ""))
            for field in ("lease", "create_revision", "mod_revision", "version"):
                kv[field] = int(kv.get(field, 0))
            out.append(kv)
        return out
    raise OSError(f"no etcd endpoint answered: {last}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _add_member(endpoint: str, peer_url: str, timeout: float = 30.0) -> None:
    # etcd refuses a reconfiguration (503) while a member started or joined less than ~5 s ago.
    deadline = time.monotonic() + timeout
    while True:
        try:
            etcd_call(endpoint, "/v3/cluster/member/add", {"peerURLs": [peer_url]}, timeout=10)
            return
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                raise RuntimeError(f"etcd member add failed: {e.code} {e.read()[:300]!r}") from e
            time.sleep(0.5)


class EtcdCluster:
    """Several members (three by default) on loopback that form one etcd cluster, as a production
    control plane runs it. Use `EtcdCluster.launch(workdir)`; then `.endpoints` (every member's client URL),
    `members`, `leader_index()`, `transfer_leadership(i)`, `restart()` (all members: a full outage) and
    `stop()`. A member is killed and brought back with `members[i].kill()` / `members[i].start()`."""

    def __init__(self, members: Sequence[EtcdServer]) -> None:
        self.members = list(members)

    @classmethod
    def launch(cls, workdir: Path, *, size: int = 3, binary: str = "etcd") -> EtcdCluster:
        resolved = shutil.which(binary)
        if resolved is None:
            raise RuntimeError(f"etcd binary {binary!r} not found on PATH")
        last: Exception | None = None
        for attempt in range(_START_ATTEMPTS):
            ports = [(free_port(), free_port()) for _ in range(size)]
            initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
            cluster = cls([EtcdServer(workdir / f"try{attempt}" / f"m{i}", client_port=client, peer_port=peer,
                                      binary=resolved, name=f"m{i}", initial_cluster=initial)
                           for i, (client, peer) in enumerate(ports)])
            try:
                cluster.start()
                return cluster
            except RuntimeError as exc:
                last = exc
                for member in cluster.members:
                    member.kill()
        raise RuntimeError(f"etcd cluster did not start after {_START_ATTEMPTS} attempts: {last}")

    @classmethod
    def grow(cls, first: EtcdServer, workdir: Path, *, size: int = 3) -> EtcdCluster:
        """Grow the running single-member `first` to `size` members, one at a time as an operator does
        (`member add`, then the new member starts with --initial-cluster-state existing); its data stays."""
        members = [first]
        for i in range(1, size):
            member = EtcdServer(workdir / f"m{i}", client_port=free_port(), peer_port=free_port(),
                                binary=first.binary, name=f"m{i}", cluster_state="existing")
            _add_member(first.endpoint, member.peer_url)
            member.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in (*members, member))
            member.start()
            members.append(member)
        return cls(members)

    @property
    def endpoint(self) -> str:
        return self.members[0].endpoint

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def start(self) -> None:
        """Start every member that is not running, then wait until each is healthy (has a leader)."""
        for member in self.members:
            if not member.running:
                member.start(wait=False)
        for member in self.members:
            member.wait_healthy()

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def restart(self) -> None:
        """Stop every member, then start them all again on their data dirs: etcd is gone meanwhile."""
        self.stop()
        self.start()

    def member_id(self, index: int) -> str:
        return str(etcd_call(self.members[index].endpoint, "/v3/maintenance/status", {})["header"]["member_id"])

    def leader_index(self) -> int:
        """Which member leads the raft group now (asked of the first member that answers)."""
        for member in self.members:
            if not member.running:
                continue
            try:
                leader = str(etcd_call(member.endpoint, "/v3/maintenance/status", {})["leader"])
            except OSError:
                continue
            for i, other in enumerate(self.members):
                if other.running and self.member_id(i) == leader:
                    return i
        raise RuntimeError("no etcd member knows a leader")

    def transfer_leadership(self, index: int, timeout: float = _HEALTH_TIMEOUT_S) -> None:
        """Make member `index` the raft leader (a no-op when it is)."""
        deadline = time.monotonic() + timeout
        while (current := self.leader_index()) != index:
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd leadership did not move to member {index}")
            try:
                etcd_call(self.members[current].endpoint, "/v3/maintenance/transfer-leadership",
                          {"targetID": self.member_id(index)}, timeout=timeout)
            except urllib.error.HTTPError:
                time.sleep(0.2)  # an election under way: ask the next leader
