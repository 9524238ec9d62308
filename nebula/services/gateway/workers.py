"""`gateway.workers > 1`: several gateway processes on one port, kept by a small supervisor.

One Python process saturates one core at a few thousand requests per second; past that, requests queue
and latency grows. Workers share the port with SO_REUSEPORT, so the kernel spreads connections over them
and each has a core of its own. Each worker is a whole gateway (its own watches, load poll, metrics), so
nothing crosses processes on the request path.

The supervisor (the unit's main process) is, to its workers, what systemd is to a service: it gives each
one a NOTIFY_SOCKET of its own making and a WATCHDOG_USEC, so a worker runs exactly the code a single
gateway does and reports READY=1 and WATCHDOG=1 as usual. The supervisor tells systemd READY=1 once every
worker was ready, feeds systemd's watchdog from its own loop, restarts a worker that exits (with backoff,
the others serving meanwhile) and kills one that stops pinging. Workers die with the supervisor
(PR_SET_PDEATHSIG), and SIGTERM to the supervisor drains them all.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nebula.adapters.sdnotify import Notifier
from nebula.adapters.timeouts import timeout
from nebula.core.restarts import crash_backoff
from nebula.services.runtime import notify_ready_and_watch

log = logging.getLogger(__name__)

# A worker's watchdog when systemd gives the supervisor none: a hung worker is replaced within this.
DEFAULT_WORKER_WATCHDOG_S = 10.0
START_TIMEOUT_S = 60.0  # READY=1 within this, or the worker is killed and started again
BACKOFF_FIRST_S = 1.0
STOP_TIMEOUT_S = 25.0  # inside the unit's TimeoutStopSec=30, so systemd need not SIGKILL


@dataclass
class Worker:
    """What the supervisor knows of worker `index` (pure bookkeeping; the processes are the supervisor's)."""

    index: int
    pid: int = 0
    started_at: float = 0.0
    ready: bool = False
    last_ping: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    start_at: float = 0.0  # when to start it next (after a death, backoff_s later)
    killed: bool = False  # killed as stuck, not yet reaped


@dataclass
class WorkerBook:
    """The supervisor's decisions as pure functions of notifications, deaths and the time."""

    count: int
    watchdog_s: float
    workers: list[Worker] = field(default_factory=list)
    announced: bool = False

    def __post_init__(self) -> None:
        self.workers = [Worker(i) for i in range(self.count)]

    def by_pid(self, pid: int) -> Worker | None:
        return next((w for w in self.workers if w.pid == pid and pid), None)

    def started(self, w: Worker, pid: int, now: float) -> None:
        w.pid, w.started_at, w.ready, w.last_ping, w.killed = pid, now, False, now, False

    def notified(self, pid: int, fields: Mapping[str, str], now: float) -> Worker | None:
        w = self.by_pid(pid)
        if w is None:
            return None
        if fields.get("READY") == "1":
            w.ready = True
        if "READY" in fields or "WATCHDOG" in fields:
            w.last_ping = now
        return w

    def exited(self, w: Worker, now: float) -> None:
        """Worker `w` is gone: start it again at once if it had been running a while, else after a backoff."""
        w.backoff_s = crash_backoff(w.backoff_s, now - w.started_at, BACKOFF_FIRST_S)
        w.pid, w.ready, w.restarts, w.start_at = 0, False, w.restarts + 1, now + w.backoff_s

    def due_to_start(self, now: float) -> list[Worker]:
        return [w for w in self.workers if not w.pid and w.start_at <= now]

    def stuck(self, now: float) -> list[Worker]:
        """Running workers to kill: not ready within START_TIMEOUT_S, or silent for a whole watchdog period.
        Each is returned once: it counts as killed until its exit is seen."""
        stuck = [w for w in self.workers if w.pid and not w.killed and (
            (not w.ready and now - w.started_at > START_TIMEOUT_S)
            or (w.ready and now - w.last_ping > self.watchdog_s))]
        for w in stuck:
            w.killed = True
        return stuck

    def all_ready(self) -> bool:
        return all(w.ready for w in self.workers)

    def status(self) -> str:
        return f"{sum(w.ready for w in self.workers)}/{self.count} workers ready"


def parse_notification(data: bytes) -> dict[str, str]:
    """`KEY=value` lines of an sd_notify datagram."""
    out = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, eq, value = line.partition("=")
        if eq:
            out[key] = value
    return out


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class NotifyListener:
    """The supervisor's NOTIFY_SOCKET: an abstract unix datagram socket that learns each sender's pid."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(f"\0nebula-gateway-{os.getpid()}-{id(self)}")
        name = self.sock.getsockname()
        self.address = "@" + (name[1:].decode() if isinstance(name, bytes) else name[1:])

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Every datagram waiting, as (sender pid, fields)."""
        out: list[tuple[int, dict[str, str]]] = []
        creds_size = struct.calcsize("3i")
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
            except BlockingIOError:
                return out
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:creds_size])[0]
            out.append((pid, parse_notification(data)))

    def close(self) -> None:
        self.sock.close()


def worker_env(env: Mapping[str, str], notify_address: str, watchdog_s: float) -> dict[str, str]:
    """A worker's environment: the supervisor in systemd's place (its socket, a watchdog of its choosing)."""
    out = {k: v for k, v in env.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    out["NOTIFY_SOCKET"] = notify_address
    out["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
    return out


async def supervise_workers(count: int, worker_argv: Callable[[int], Sequence[str]], env: Mapping[str, str],
                            notifier: Notifier, stop: asyncio.Event,
                            clock: Callable[[], float] = time.monotonic, pass_fds: Sequence[int] = (),
                            on_exit: Callable[[int], None] = lambda index: None) -> int:
    """Run `count` workers (`worker_argv(i)`, inheriting `pass_fds`) until `stop` is set, then SIGTERM them and
    wait. `on_exit(i)` is called once worker i has exited, before it is started again. Returns 0."""
    watchdog_s = notifier.watchdog_interval_s * 2 if notifier.watchdog_interval_s else DEFAULT_WORKER_WATCHDOG_S
    book = WorkerBook(count, watchdog_s)
    listener = NotifyListener()
    child_env = worker_env(env, listener.address, watchdog_s)
    procs: dict[int, asyncio.subprocess.Process] = {}
    exits: dict[int, int] = {}  # pid -> exit status, of workers gone since the last pass
    loop = asyncio.get_running_loop()
    # Set by a notification, a worker's exit or `stop`: time for a pass of the loop below.
    wake = asyncio.Event()
    loop.add_reader(listener.sock.fileno(), wake.set)
    stopper = asyncio.create_task(_set_after(stop.wait(), wake))
    watchers: set[asyncio.Task[None]] = set()
    feeder: asyncio.Task[None] | None = None

    async def reap(proc: asyncio.subprocess.Process) -> None:
        exits[proc.pid] = await proc.wait()
        wake.set()

    async def start(w: Worker) -> None:
        proc = await asyncio.create_subprocess_exec(*worker_argv(w.index), env=child_env, pass_fds=pass_fds,
                                                    stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent)
        book.started(w, proc.pid, clock())
        procs[proc.pid] = proc
        watcher = asyncio.create_task(reap(proc), name=f"gateway-worker-{w.index}")
        watchers.add(watcher)
        watcher.add_done_callback(watchers.discard)
        log.info("gateway worker %d started (pid %d)", w.index, proc.pid, extra={"NEBULA_WORKER": w.index})

    try:
        while not stop.is_set():
            for w in book.due_to_start(clock()):
                await start(w)
            for pid, fields in listener.receive():
                worker = book.notified(pid, fields, clock())
                if worker is not None and fields.get("READY") == "1":
                    log.info("gateway worker %d ready (pid %d)", worker.index, pid,
                             extra={"NEBULA_WORKER": worker.index})
            if not book.announced and book.all_ready():
                book.announced = True
                feeder = asyncio.create_task(notify_ready_and_watch(notifier, lambda: True, book.status),
                                             name="gateway-supervisor-watchdog")
            for w in book.stuck(clock()):
                log.error("gateway worker %d (pid %d) is stuck (%s); killing it", w.index, w.pid,
                          "never ready" if not w.ready else "watchdog timeout", extra={"NEBULA_WORKER": w.index})
                with contextlib.suppress(ProcessLookupError):
                    procs[w.pid].kill()
            for pid, status in list(exits.items()):
                del exits[pid]
                procs.pop(pid, None)
                gone = book.by_pid(pid)
                if gone is not None:
                    book.exited(gone, clock())
                    on_exit(gone.index)
                    log.error("gateway worker %d (pid %d) exited with status %d; starting it again in %.0f s",
                              gone.index, pid, status, gone.backoff_s, extra={"NEBULA_WORKER": gone.index})
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with timeout(min(1.0, watchdog_s / 4)):
                    await wake.wait()
    finally:
        loop.remove_reader(listener.sock.fileno())
        stopper.cancel()
        if feeder is not None:
            feeder.cancel()
        notifier.notify(STOPPING=1)
        await _stop_all(list(procs.values()))
        for watcher in list(watchers):
            watcher.cancel()
        listener.close()
    return 0


async def _set_after(waiting: Coroutine[Any, Any, object], event: asyncio.Event) -> None:
    await waiting
    event.set()


async def _stop_all(procs: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM (the workers drain), then SIGKILL whatever is left after STOP_TIMEOUT_S."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    waits = [asyncio.create_task(proc.wait()) for proc in procs]
    if not waits:
        return
    _, late = await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    if late:
        await asyncio.wait(late, timeout=5)


def worker_command(config_path: str) -> Callable[[int], list[str]]:
    return lambda i: [sys.executable, "-m", "nebula", "--config", config_path, "gateway", "run", "--worker", str(i)]
