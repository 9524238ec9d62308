"""Where an instance's weights come from: local directories, or hub repos downloaded once per node.

`ModelSources.resolve()` never blocks: it answers Ready (a local directory), Fetching (a download runs or
waits for its retry; with progress) or Broken (permanent: the instance fails with the message), and starts
the download the first time a hub source is asked for. Every instance and pull of one source shares one
download (one job per source id in this agent, and a file lock per source across processes sharing the
cache). A finished download is recorded in `<cache>/index/`, so a later resolve, in this run or after a
restart, answers from disk with no network call.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from nebula.core.config import NodeConfig
from nebula.core.sources import SourceKind, SourceRef, parse_source
from nebula.errors import PermanentError, TemporaryError, ValidationError

log = logging.getLogger("nebula.agent")
Progress = Callable[[int, int], None]
"""(bytes done, bytes in all); called from the download's thread."""
GIB = 1 << 30
MIB = 1 << 20


class Fetcher(Protocol):
    def fetch(self, ref: SourceRef, cache_dir: Path, progress: Progress) -> Path:
        """Blocking download of `ref` under `cache_dir`: its local directory, or PermanentError/TemporaryError."""
        ...


@dataclass(frozen=True)
class Ready:
    path: str


@dataclass(frozen=True)
class Fetching:
    message: str
    progress: float | None = None


@dataclass(frozen=True)
class Broken:
    message: str


Resolution = Ready | Fetching | Broken


@dataclass(frozen=True)
class DownloadMetrics:
    downloads: Counter
    bytes: Counter
    active: Gauge

    @staticmethod
    def create(registry: CollectorRegistry) -> DownloadMetrics:
        return DownloadMetrics(
            downloads=Counter("nebula_agent_downloads_total", "Model downloads ended, by source kind and result "
                              "(ok, retry: failed for a passing reason, failed: permanently)", ["kind", "result"],
                              registry=registry),
            bytes=Counter("nebula_agent_download_bytes_total", "Bytes of model weights downloaded", ["kind"],
                          registry=registry),
            active=Gauge("nebula_agent_downloads_active", "Model downloads running now", registry=registry),
        )


def describe(done: int, total: int) -> str:
    """'downloading 43% (1.2/2.8 GiB)'."""
    if total <= 0:
        return "downloading (listing files)"
    unit, div = ("GiB", GIB) if total >= GIB else ("MiB", MIB)
    return f"downloading {100 * done // total}% ({done / div:.1f}/{total / div:.1f} {unit})"


@dataclass
class _Job:
    ref: SourceRef
    running: bool = False
    done: int = 0
    total: int = 0
    shown: Fetching = field(default_factory=lambda: Fetching(describe(0, 0)))
    shown_at: float = float("-inf")
    failures: int = 0
    retry_at: float = 0.0
    error: str = ""
    broken: str | None = None

    def update(self, done: int, total: int) -> None:
        # Called from the download thread: two int stores, read by the loop (atomic under the GIL).
        self.done, self.total = done, total


class ModelSources:
    def __init__(self, cache_dir: Path, fetchers: Mapping[SourceKind, Fetcher], metrics: DownloadMetrics, *,
                 clock: Callable[[], float] = time.monotonic, on_change: Callable[[], None] = lambda: None,
                 retry_base_s: float = 2.0, retry_max_s: float = 300.0, publish_s: float = 1.0) -> None:
        self.cache_dir = cache_dir
        self.fetchers = fetchers
        self.metrics = metrics
        self.clock = clock
        self.on_change = on_change
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.publish_s = publish_s
        self._jobs: dict[str, _Job] = {}
        self._ready: dict[str, str] = self._read_index()

    # --- the agent's questions ----------------------------------------------------------------------
    def resolve(self, source: str, revision: str | None = None) -> Resolution:
        try:
            ref = parse_source(source, revision)
        except ValidationError as e:
            return Broken(e.message)
        if ref.kind is SourceKind.LOCAL:
            return _resolve_local(ref.location)
        ready = self._cached_path(ref.id)
        if ready is not None:
            return Ready(ready)
        job = self._jobs.get(ref.id)
        if job is None:
            job = self._jobs[ref.id] = _Job(ref)
        if job.broken is not None:
            return Broken(job.broken)
        now = self.clock()
        if not job.running and now >= job.retry_at:
            self._start(job)
            if job.broken is not None:
                return Broken(job.broken)
        if job.running:
            if now - job.shown_at >= self.publish_s:
                job.shown = Fetching(describe(job.done, job.total), job.done / job.total if job.total else 0.0)
                job.shown_at = now
            return job.shown
        wait = max(0.0, job.retry_at - now)
        return Fetching(f"download failed ({job.failures} time(s)), retrying in {wait:.0f} s: {job.error}",
                        job.done / job.total if job.total else 0.0)

    def cached(self) -> tuple[str, ...]:
        """Source ids whose weights this node holds, sorted (advertised in the node record)."""
        return tuple(sorted(self._ready))

    def downloading(self) -> list[str]:
        return sorted(i for i, j in self._jobs.items() if j.running)

    def progress_lines(self) -> list[str]:
        """`hf://org/name: downloading 43% (1.2/2.8 GiB)` for each download running (the agent's STATUS=)."""
        return [f"{sid}: {job.shown.message}" for sid, job in sorted(self._jobs.items()) if job.running]

    def forget_unused(self, in_use: Iterable[str]) -> None:
        """Drop the failures of sources nothing asks for now, so a model loaded again gets a fresh try."""
        keep = set(in_use)
        for sid in [s for s, j in self._jobs.items() if not j.running and s not in keep]:
            del self._jobs[sid]

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until no download runs (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while any(j.running for j in self._jobs.values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"downloads still running: {self.downloading()}")
            await asyncio.sleep(0.02)

    # --- downloads ----------------------------------------------------------------------------------
    def _start(self, job: _Job) -> None:
        fetcher = self.fetchers.get(job.ref.kind)
        if fetcher is None:
            job.broken = f"{job.ref.id}: downloads from {job.ref.kind.value} are not configured on this node"
            return
        job.running = True
        job.shown_at = float("-inf")
        self.metrics.active.inc()
        loop = asyncio.get_running_loop()
        log.info("downloading %s into %s", job.ref.id, self.cache_dir, extra={"NEBULA_SOURCE": job.ref.id})

        def work() -> None:
            try:
                result: Path | BaseException = self._fetch_locked(fetcher, job)
            except BaseException as e:  # handed to the loop, which classifies it
                result = e
            try:
                loop.call_soon_threadsafe(self._finished, job, result)
            except RuntimeError:
                pass  # the loop closed while we downloaded: the agent is stopping

        # A daemon thread, not the loop's executor: stopping the agent must not wait for a download to end
        # (the hub cache keeps the partial files, and the next run resumes them).
        threading.Thread(target=work, name=f"download {job.ref.id}", daemon=True).start()

    def _fetch_locked(self, fetcher: Fetcher, job: _Job) -> Path:
        locks = self.cache_dir / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with (locks / f"{_file_name(job.ref.id)}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another agent sharing this cache may be fetching it now
            done = _read_entry(self._index_dir() / f"{_file_name(job.ref.id)}.json")
            if done is not None:
                return Path(done)
            path = fetcher.fetch(job.ref, self.cache_dir / job.ref.kind.value, job.update)
            self._write_index(job.ref.id, path, job.total)
            return path

    def _finished(self, job: _Job, result: Path | BaseException) -> None:
        job.running = False
        self.metrics.active.dec()
        kind = job.ref.kind.value
        fields = {"NEBULA_SOURCE": job.ref.id}
        if isinstance(result, Path):
            self._ready[job.ref.id] = str(result)
            self._jobs.pop(job.ref.id, None)
            self.metrics.downloads.labels(kind, "ok").inc()
            self.metrics.bytes.labels(kind).inc(job.total)
            log.info("downloaded %s (%d bytes) to %s", job.ref.id, job.total, result, extra=fields)
        elif isinstance(result, TemporaryError):
            job.failures += 1
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** (job.failures - 1))
            job.retry_at = self.clock() + delay
            job.error = str(result)
            self.metrics.downloads.labels(kind, "retry").inc()
            log.warning("download of %s failed, retrying in %.0f s: %s", job.ref.id, delay, result, extra=fields)
        else:
            job.broken = str(result) if isinstance(result, PermanentError) else (
                f"{job.ref.id}: download failed: {type(result).__name__}: {result}")
            self.metrics.downloads.labels(kind, "failed").inc()
            log.error("download of %s failed for good: %s", job.ref.id, job.broken, extra=fields)
        self.on_change()

    # --- the index of finished downloads ------------------------------------------------------------
    def _index_dir(self) -> Path:
        return self.cache_dir / "index"

    def _cached_path(self, sid: str) -> str | None:
        path = self._ready.get(sid) or _read_entry(self._index_dir() / f"{_file_name(sid)}.json")
        if path is None or not Path(path).is_dir():
            self._ready.pop(sid, None)  # deleted by hand: fetch again
            return None
        self._ready[sid] = path
        return path

    def _write_index(self, sid: str, path: Path, size: int) -> None:
        self._index_dir().mkdir(parents=True, exist_ok=True)
        entry = self._index_dir() / f"{_file_name(sid)}.json"
        tmp = entry.with_suffix(".tmp")
        tmp.write_text(json.dumps({"source": sid, "path": str(path), "bytes": size, "fetched_at": time.time()}))
        tmp.replace(entry)

    def _read_index(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for entry in sorted(self._index_dir().glob("*.json")) if self._index_dir().is_dir() else []:
            try:
                data = json.loads(entry.read_text())
                sid, path = str(data["source"]), str(data["path"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if Path(path).is_dir():
                out[sid] = path
        return out


def _file_name(sid: str) -> str:
    return urllib.parse.quote(sid, safe="@")


def _read_entry(entry: Path) -> str | None:
    try:
        path = str(json.loads(entry.read_text())["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if Path(path).is_dir() else None


def _resolve_local(path: str) -> Resolution:
    p = Path(path)
    if not p.exists():
        return Broken(f"source path {path} does not exist on this node")
    if not (p / "config.json").exists():
        return Broken(f"source path {path} has no config.json: not a model directory")
    return Ready(str(p.resolve()))


def read_token(path: str) -> str | None:
    """The token in `path` ('' = none); PermanentError when the file is named but unreadable."""
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as e:
        raise PermanentError(f"cannot read the token file {path}: {e.strerror}") from None


def build_sources(cfg: NodeConfig, registry: CollectorRegistry, *, on_change: Callable[[], None] = lambda: None,
                  clock: Callable[[], float] = time.monotonic) -> ModelSources:
    """ModelSources with this node's configured hub endpoints."""
    from nebula.services.agent.download_hf import HfFetcher
    from nebula.services.agent.download_modelscope import ModelScopeFetcher

    fetchers: dict[SourceKind, Fetcher] = {
        SourceKind.HF: HfFetcher(cfg.hf_endpoint, cfg.hf_token_file, cfg.download_workers),
        SourceKind.MODELSCOPE: ModelScopeFetcher(cfg.modelscope_endpoint, cfg.modelscope_token_file),
    }
    return ModelSources(Path(cfg.cache_dir), fetchers, DownloadMetrics.create(registry), clock=clock,
                        on_change=on_change, retry_max_s=cfg.download_retry_max_s)
