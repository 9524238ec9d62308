"""A real single-member etcd server for integration tests: free loopback ports, its own data dir.

The process is exec'd directly (no shell), so `pid` is etcd's own and signals reach it. Every
`ETCD_*` variable is stripped from its environment because etcd reads each one as a flag.
`restart()` keeps the data dir and ports, which is what a systemd restart of etcd looks like.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

_HEALTH_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
_START_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like etcd itself, ignore TIME_WAIT leftovers of our own previous run; a listener still fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}


class EtcdServer:
    """Use `EtcdServer.launch(workdir)`; then `.endpoint`, `stop()`, `start()`, `restart()`, `kill()`,
    `pause()` (SIGSTOP: accepts TCP, never answers) and `resume()`."""

    def __init__(self, workdir: Path, *, client_port: int, peer_port: int, binary: str = "etcd") -> None:
        self.workdir = workdir
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
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("etcd is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name", "test",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--initial-cluster-state", "new",
        ]  # fmt: skip

    def start(self) -> None:
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
