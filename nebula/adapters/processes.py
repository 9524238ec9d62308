"""Engine units as plain child processes, for machines where systemd is not PID 1 (containers, CI, dev).

Each engine runs `<argv> engine run <instance>` in its own session, so an agent restart (or a Ctrl-C in
the agent's terminal) does not take the engines down. `<run_dir>/pids/<instance>.pid` records the pid and
the kernel's start time of the process (field 22 of /proc/<pid>/stat); a later agent re-adopts engines from
these files, and the start time guards against a recycled pid being mistaken for an engine.

What systemd would report is mirrored: ACTIVE while the process runs (the agent checks engine health itself;
there is no NOTIFY_SOCKET here), DEACTIVATING during a stop, FAILED after an exit nobody asked for. An exit
status is kept in `<instance>.exit` until reset() or the next start(). As systemd does with a unit's cgroup,
whatever is left of an engine's session once its main process is gone is killed: vLLM outlives a killed
supervisor, and vLLM's workers outlive a killed vLLM, each holding the port or the (GPU) memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nebula.core.units import UnitState, UnitStatus
from nebula.errors import PermanentError, TemporaryError

_POLL_S = 0.1
_KILL_WAIT_S = 10.0


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_time: int
    stopping: bool = False


def process_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The start time (clock ticks after boot) of a live, non-zombie `pid`; None if there is none."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _exit_result(returncode: int) -> str:
    return f"signal:{-returncode}" if returncode < 0 else f"exit-code:{returncode}"


class ProcessEngineUnits:
    """`EngineUnits` backed by child processes of the agent."""

    def __init__(self, argv: Sequence[str], run_dir: Path, log_dir: Path, env: Mapping[str, str], *,
                 stop_timeout_s: float = 40.0, user: str = "", home: Path | None = None) -> None:
        """`argv` is the prefix that runs Nebula, e.g. [sys.executable, "-m", "nebula"].

        `stop_timeout_s` bounds SIGTERM -> exit before SIGKILL; keep it above the supervisor's own
        engine.stop_timeout_s so the supervisor gets to drain vLLM first. `user` (the agent being root):
        engines run as that user, with no supplementary groups, `home` as their HOME, and from `/`.
        """
        self._argv = list(argv)
        self._pid_dir = run_dir / "pids"
        self._log_dir = log_dir
        self._env = engine_env(env)
        self._user = user
        self._home = home
        self._stop_timeout_s = stop_timeout_s
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._stops: dict[str, asyncio.Task[None]] = {}

    # -- EngineUnits ---------------------------------------------------------------------------------

    async def list(self) -> Mapping[str, UnitStatus]:
        self._reap()
        out: dict[str, UnitStatus] = {}
        for instance in self._known_instances():
            status = self._status(instance)
            if status is not None:
                out[instance] = status
        return out

    async def start(self, instance: str) -> None:
        _check_instance(instance)
        if instance in self._stops:
            raise TemporaryError(f"engine {instance} is still stopping")
        self._reap()
        if self._alive_record(instance) is not None:
            return
        self._pid_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._exit_path(instance).unlink(missing_ok=True)
        child = _spawn([*self._argv, "engine", "run", instance], self._log_dir / f"{instance}.log", self._env,
                       self._as_user())
        start_time = process_start_time(child.pid)
        self._children[instance] = child
        self._write_pid(instance, PidRecord(child.pid, start_time if start_time is not None else -1))

    async def stop(self, instance: str) -> None:
        _check_instance(instance)
        if instance in self._stops:
            return
        record = self._alive_record(instance)
        if record is None:
            self._forget(instance)
            return
        self._write_pid(instance, PidRecord(record.pid, record.start_time, stopping=True))
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
        task = asyncio.create_task(self._finish_stop(instance, record), name=f"stop-engine-{instance}")
        self._stops[instance] = task
        task.add_done_callback(lambda _t: self._stops.pop(instance, None))

    async def reset(self, instance: str) -> None:
        _check_instance(instance)
        self._exit_path(instance).unlink(missing_ok=True)

    async def recent_output(self, instance: str, lines: int) -> Sequence[str]:
        _check_instance(instance)
        return await asyncio.to_thread(_tail, self._log_dir / f"{instance}.log", lines)

    @property
    def restarts_failed(self) -> bool:
        return False  # no service manager here: the agent's restart policy applies

    async def close(self) -> None:
        """Leave running engines alone; abandon pending stops (a later agent sees `stopping` and finishes)."""
        for task in list(self._stops.values()):
            task.cancel()
        for task in list(self._stops.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- helpers -------------------------------------------------------------------------------------

    def _as_user(self) -> _User | None:
        if not self._user:
            return None
        try:
            pw = pwd.getpwnam(self._user)
        except KeyError:
            raise PermanentError(f"engine.user '{self._user}' does not exist: create it (useradd --system "
                                 f"--user-group {self._user}) or set [engine] user = \"\" to run engines as the "
                                 "agent's user") from None
        home = self._home or Path(pw.pw_dir)
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)  # its caches (vLLM, torch, Hugging Face) go here
        return _User(pw.pw_uid, pw.pw_gid, str(home))

    async def wait_stopped(self, instance: str) -> None:
        """Wait for a stop queued by stop() to finish (tests, orderly shutdown)."""
        task = self._stops.get(instance)
        if task is not None:
            await task

    async def _finish_stop(self, instance: str, record: PidRecord) -> None:
        if not await self._wait_gone(instance, record, self._stop_timeout_s):
            # The whole session: vLLM workers must not outlive a supervisor that ignored SIGTERM.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)
            await self._wait_gone(instance, record, _KILL_WAIT_S)
        _kill_leftovers(record.pid)
        self._forget(instance)

    async def _wait_gone(self, instance: str, record: PidRecord, timeout_s: float) -> bool:
        for _ in range(max(1, int(timeout_s / _POLL_S))):
            if not self._is_alive(instance, record):
                return True
            await asyncio.sleep(_POLL_S)
        return not self._is_alive(instance, record)

    def _is_alive(self, instance: str, record: PidRecord) -> bool:
        child = self._children.get(instance)
        if child is not None and child.pid == record.pid:
            return child.poll() is None
        return process_start_time(record.pid) == record.start_time

    def _status(self, instance: str) -> UnitStatus | None:
        record = self._read_pid(instance)
        if record is not None:
            if self._is_alive(instance, record):
                state = UnitState.DEACTIVATING if record.stopping else UnitState.ACTIVE
                return UnitStatus(instance, state, "running", main_pid=record.pid)
            self._note_gone(instance, record)
        result = self._read_exit(instance)
        if result is None:
            return None
        return UnitStatus(instance, UnitState.FAILED, "failed", result=result)

    def _reap(self) -> None:
        """Collect exit statuses of our own children (also keeps them from lingering as zombies)."""
        for instance, child in list(self._children.items()):
            if child.poll() is None:
                continue
            record = self._read_pid(instance)
            if record is not None and record.pid == child.pid:
                self._note_gone(instance, record)
            else:
                del self._children[instance]
                _kill_leftovers(child.pid)

    def _note_gone(self, instance: str, record: PidRecord) -> None:
        """The one place an engine's death becomes state, whichever look noticed it first (_reap's poll or
        _status's liveness check). Our own child's exit status is known once any poll saw it gone: taking
        it from the child here, not from whoever noticed, makes the result the same for every interleaving
        ("exited" is only for an engine re-adopted from an earlier agent, whose status nobody can know)."""
        child = self._children.get(instance)
        code: int | None = None
        if child is not None and child.pid == record.pid:
            code = child.poll()
            del self._children[instance]
        _kill_leftovers(record.pid)
        if record.stopping or code == 0:
            self._forget(instance)
        else:
            self._record_exit(instance, "exited" if code is None else _exit_result(code))

    def _record_exit(self, instance: str, result: str) -> None:
        self._exit_path(instance).write_text(json.dumps({"result": result}))
        self._pid_path(instance).unlink(missing_ok=True)

    def _forget(self, instance: str) -> None:
        self._pid_path(instance).unlink(missing_ok=True)
        self._exit_path(instance).unlink(missing_ok=True)
        child = self._children.get(instance)
        if child is not None and child.poll() is not None:
            del self._children[instance]

    def _alive_record(self, instance: str) -> PidRecord | None:
        record = self._read_pid(instance)
        return record if record is not None and self._is_alive(instance, record) else None

    def _known_instances(self) -> Sequence[str]:
        if not self._pid_dir.is_dir():
            return []
        names = {p.name.rsplit(".", 1)[0] for p in self._pid_dir.iterdir() if p.suffix in (".pid", ".exit")}
        return sorted(names)

    def _read_pid(self, instance: str) -> PidRecord | None:
        try:
            data = json.loads(self._pid_path(instance).read_text())
            return PidRecord(int(data["pid"]), int(data["start_time"]), bool(data.get("stopping", False)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_pid(self, instance: str, record: PidRecord) -> None:
        path = self._pid_path(instance)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": record.pid, "start_time": record.start_time,
                                   "stopping": record.stopping}))
        tmp.replace(path)  # atomic: a concurrent reader never sees half a record

    def _read_exit(self, instance: str) -> str | None:
        try:
            return str(json.loads(self._exit_path(instance).read_text())["result"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _pid_path(self, instance: str) -> Path:
        return self._pid_dir / f"{instance}.pid"

    def _exit_path(self, instance: str) -> Path:
        return self._pid_dir / f"{instance}.exit"


def _kill_leftovers(pid: int) -> None:
    """SIGKILL the rest of the process group of `pid`, an engine's main process known to be gone."""
    if process_start_time(pid) is not None:
        return  # another live process has this pid now, so the group with its number is not the engine's
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, lines: int, max_bytes: int = 64 * 1024) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return []
    return [line for line in data.decode(errors="replace").splitlines() if line.strip()][-lines:]


@dataclass(frozen=True)
class _User:
    uid: int
    gid: int
    home: str


# What the agent may hold in its environment and an engine must not see: the etcd settings (password), the
# bootstrap key, hub tokens (downloads are the agent's).
_SECRET_ENV_PREFIXES = ("NEBULA_CLUSTER_", "NEBULA_ADMIN_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                        "MODELSCOPE_API_TOKEN")


def engine_env(env: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment less what engines must not see."""
    return {k: v for k, v in env.items() if not k.startswith(_SECRET_ENV_PREFIXES)}


def _spawn(argv: Sequence[str], log_path: Path, env: Mapping[str, str],
           user: _User | None = None) -> subprocess.Popen[bytes]:
    try:
        # Opened here, by the agent: an engine under another user writes to it without owning it.
        with log_path.open("ab") as log:
            if user is None:
                return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        env=dict(env), start_new_session=True)
            return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env={**env, "HOME": user.home, "XDG_CACHE_HOME": f"{user.home}/.cache"},
                                    start_new_session=True, cwd="/", user=user.uid, group=user.gid,
                                    extra_groups=[])
    except OSError as e:
        raise PermanentError(f"cannot start {argv[0]}: {e}") from e


def _check_instance(instance: str) -> None:
    # Instance names become file names: refuse anything that could escape the pid directory.
    if not instance or "/" in instance or instance.startswith(".") or "\0" in instance:
        raise PermanentError(f"invalid engine instance name {instance!r}")
