"""A node's engine logs, followed where `nebula logs` reads them (core/engine_logs.py's EngineLogSource).

Under systemd, the journal: `journalctl -o json -n N -f` on the model's units, a child process whose output is
read on the event loop (never a blocking read) and which is killed when the tail ends. Without systemd
(engines as the agent's children), the <instance>.log files the agent writes, polled: each read is a short
one in a thread, bounded in bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

from nebula.core.engine_logs import (
    ENGINE_SLICE,
    MAX_RAW_LINE,
    LineSplitter,
    LogLine,
    LogSourceError,
    backlog_lines,
    decode_journal_entry,
    decode_text_line,
    engine_units,
    is_model_instance,
    journal_cursor,
)

READ_CHUNK = 64 * 1024
# What one poll of the log files reads at most per file; a faster writer loses the lines in between.
MAX_READ = 1024 * 1024


class JournalLogSource:
    """The backlog as `nebula logs -n N` reads it (`-u` the model's units), then, from its last entry's cursor,
    every engine unit's new entries (one match, the engines' slice, which also holds replicas started later:
    journalctl expands a `-u` glob once), of which the model's are kept."""

    def __init__(self, directory: str = "", journalctl: str = "journalctl") -> None:
        self._directory = directory  # a journal directory to read instead of the system's (tests, remote logs)
        self._journalctl = journalctl

    def _argv(self, *args: str) -> list[str]:
        argv = [self._journalctl, "--no-pager", "-q", "-o", "json", *args]
        return argv + ([f"--directory={self._directory}"] if self._directory else [])

    def backlog_argv(self, model: str, backlog: int) -> list[str]:
        return self._argv("-n", str(backlog), *(a for unit in engine_units(model) for a in ("-u", unit)))

    def follow_argv(self, cursor: str) -> list[str]:
        start = [f"--after-cursor={cursor}"] if cursor else ["-n", "0"]
        return self._argv("-f", *start, f"_SYSTEMD_SLICE={ENGINE_SLICE}")

    @contextlib.asynccontextmanager
    async def tail(self, model: str, backlog: int) -> AsyncIterator[AsyncIterator[LogLine]]:
        procs: list[asyncio.subprocess.Process] = []
        try:
            yield self._lines(model, backlog, procs)
        finally:
            for proc in procs:
                await _end(proc)

    async def _lines(self, model: str, backlog: int, procs: list[asyncio.subprocess.Process]
                     ) -> AsyncIterator[LogLine]:
        cursor = ""
        if backlog > 0:
            proc = await _spawn(self.backlog_argv(model, backlog), procs)
            async for raw in _raw_lines(proc):
                line = decode_journal_entry(raw)
                if line is not None:
                    cursor = journal_cursor(raw) or cursor
                    yield line
            if await proc.wait() != 0:
                raise LogSourceError(await _why(proc))
        proc = await _spawn(self.follow_argv(cursor), procs)
        async for raw in _raw_lines(proc):
            line = decode_journal_entry(raw)
            if line is not None and is_model_instance(line.instance, model):
                yield line
        raise LogSourceError(await _why(proc))


async def _spawn(argv: list[str], procs: list[asyncio.subprocess.Process]) -> asyncio.subprocess.Process:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise LogSourceError(f"cannot run journalctl: {e.strerror or e}") from None
    procs.append(proc)
    return proc


async def _raw_lines(proc: asyncio.subprocess.Process) -> AsyncIterator[bytes]:
    assert proc.stdout is not None
    splitter = LineSplitter(MAX_RAW_LINE)
    while data := await proc.stdout.read(READ_CHUNK):
        for raw in splitter.feed(data):
            yield raw


async def _why(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    why = (await proc.stderr.read(400)).decode("utf-8", "replace").strip()
    return f"journalctl ended{': ' + why if why else ''}"


async def _end(proc: asyncio.subprocess.Process) -> None:
    """Kill the reader (it only reads: nothing to flush) and reap it, even while being cancelled."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await asyncio.shield(proc.wait())


class FileLogSource:
    def __init__(self, log_dir: Path, poll_s: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self._dir, self._poll_s, self._clock = log_dir, poll_s, clock

    @contextlib.asynccontextmanager
    async def tail(self, model: str, backlog: int) -> AsyncIterator[AsyncIterator[LogLine]]:
        lines = self._follow(model, backlog)
        try:
            yield lines
        finally:
            await lines.aclose()

    def _files(self, model: str) -> list[Path]:
        try:
            return sorted(p for p in self._dir.glob("*.log") if is_model_instance(p.stem, model))
        except OSError as e:
            raise LogSourceError(f"cannot list {self._dir}: {e.strerror}") from None

    async def _follow(self, model: str, backlog: int) -> AsyncGenerator[LogLine, None]:
        offsets: dict[Path, int] = {}
        splitters: dict[Path, LineSplitter] = {}
        first: list[LogLine] = []
        for path in await asyncio.to_thread(self._files, model):
            data, offsets[path] = await asyncio.to_thread(_read_from, path, -1, MAX_READ)
            first += [decode_text_line(raw, path.stem, self._clock()) for raw in backlog_lines(data, backlog)]
            splitters[path] = LineSplitter(MAX_RAW_LINE)
            if not data.endswith(b"\n"):  # a line being written: the next read brings its end
                splitters[path].feed(data[data.rfind(b"\n") + 1:])
        for line in first[-backlog:] if backlog > 0 else []:
            yield line
        while True:
            await asyncio.sleep(self._poll_s)
            for path in await asyncio.to_thread(self._files, model):
                start = offsets.get(path, 0)  # a file that appeared since (a new replica): from its start
                data, offsets[path] = await asyncio.to_thread(_read_from, path, start, MAX_READ)
                for raw in splitters.setdefault(path, LineSplitter(MAX_RAW_LINE)).feed(data):
                    yield decode_text_line(raw, path.stem, self._clock())


def _read_from(path: Path, offset: int, limit: int) -> tuple[bytes, int]:
    """The bytes of `path` from `offset` (-1: the last `limit`; past the end, a truncated file: from 0), at most
    the last `limit` of them, and the offset after them. A file gone reads as empty."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            if offset < 0 or offset > size:
                offset = 0 if offset >= 0 else max(0, size - limit)
            offset = max(offset, size - limit)
            f.seek(offset)
            return f.read(size - offset), size
    except FileNotFoundError:
        return b"", 0
    except OSError as e:
        raise LogSourceError(f"cannot read {path}: {e.strerror}") from None
