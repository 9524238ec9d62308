"""`Mirror[T]`: a typed, self-healing copy of one etcd prefix, the one way services read cluster state.

Each record is decoded once, when it changes (`RecordKind.decode`: JSON, fields, and the key it must live
under). A record that does not decode is contained: it is left out of `records`, listed in `bad` with the
reason, logged once per revision and counted; the records beside it and the watch go on. Any error while
following the prefix (the store, a decoder bug, a consumer's callback) restarts the mirror from a fresh
listing with backoff, so no input can end it. `live` says whether the copy can be trusted: a service
feeds its watchdog and answers its health check only while all its mirrors are live.

An unreachable store is not a fault of the copy: the mirror keeps its last view (the gateway keeps
serving from it) and stays live while it retries. A failure that is not the store's makes it not live
until a listing has been delivered cleanly again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from nebula.adapters.watching import Sleep, backoff_delay
from nebula.core.records import RecordKind
from nebula.core.store import EventType, KeyValue, Store
from nebula.errors import TemporaryError, ValidationError

log = logging.getLogger("nebula.cluster")
T = TypeVar("T")


@dataclass(frozen=True)
class MirrorState(Generic[T]):
    """What a mirror's consumer gets after each change: a value it may keep."""

    records: Mapping[str, T]
    """Decoded records by key."""
    bad: Mapping[str, str] = field(default_factory=dict)
    """Keys under the prefix whose record was refused, with the reason."""
    revision: int = 0


OnChange = Callable[[MirrorState[T]], Awaitable[None] | None]


class MirrorMetrics:
    """One set per service registry, labelled by prefix, shared by the service's mirrors."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bad_records = Gauge("nebula_cluster_bad_records", "Records under a prefix this service refused "
                                 "(not decodable, or stored under another record's key)", ["prefix"],
                                 registry=registry)
        self.bad_revisions = Counter("nebula_cluster_bad_records_seen", "Refused record revisions, each counted "
                                     "once", ["prefix"], registry=registry)
        self.restarts = Counter("nebula_cluster_mirror_restarts", "Times a mirror listed its prefix again after "
                                "an error", ["prefix", "cause"], registry=registry)
        self.live = Gauge("nebula_cluster_mirror_live", "1 while the mirror of a prefix can be trusted",
                          ["prefix"], registry=registry)


class Mirror(Generic[T]):
    def __init__(self, store: Store, kind: RecordKind[T], metrics: MirrorMetrics, *, prefix: str | None = None,
                 on_change: OnChange[T] | None = None, retry_delay: float = 0.5, max_retry_delay: float = 10.0,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._store = store
        self._kind = kind
        self.prefix = prefix if prefix is not None else kind.prefix
        if not self.prefix.startswith(kind.prefix):
            raise ValueError(f"{self.prefix!r} is not under {kind.prefix!r}")
        self._metrics = metrics
        self._on_change = on_change
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._sleep = sleep
        self._records: dict[str, T] = {}
        self._bad: dict[str, tuple[int, str]] = {}  # key -> (mod_revision, reason)
        self._revision = 0
        self._running = False
        self._faulted = False  # a failure that was not the store's, since the last clean listing
        self._listed_since_last_failure = False
        self.synced = asyncio.Event()  # set once the first listing has been delivered
        metrics.live.labels(self.prefix).set(0)

    # --- what consumers read ----------------------------------------------------------------------------
    @property
    def records(self) -> Mapping[str, T]:
        return self._records

    @property
    def bad(self) -> Mapping[str, str]:
        return {k: reason for k, (_, reason) in self._bad.items()}

    @property
    def live(self) -> bool:
        """Running, listed at least once, and no fault of its own since its last clean listing."""
        return self._running and self.synced.is_set() and not self._faulted

    def state(self) -> MirrorState[T]:
        return MirrorState(records=dict(self._records), bad=self.bad, revision=self._revision)

    # --- following the prefix ------------------------------------------------------------------------
    async def run(self) -> NoReturn:
        """Follow the prefix until cancelled; never ends otherwise, whatever the store or the records hold."""
        attempt = 0
        self._running = True
        try:
            while True:
                try:
                    await self._follow()
                    cause = "watch-ended"  # a watch ends only when its consumer stops it: a store bug
                except TemporaryError as exc:  # CompactedError included: both mean "list again"
                    cause = "store"
                    log.warning("mirror of %s interrupted (%s); listing it again", self.prefix, exc,
                                extra={"NEBULA_PREFIX": self.prefix})
                except Exception:
                    cause = "error"
                    self._set_faulted(True)
                    log.exception("mirror of %s failed; listing it again", self.prefix,
                                  extra={"NEBULA_PREFIX": self.prefix})
                self._metrics.restarts.labels(self.prefix, cause).inc()
                attempt = 1 if self._listed_since_last_failure else attempt + 1
                await self._sleep(backoff_delay(attempt, base=self._retry_delay, cap=self._max_retry_delay))
        finally:
            self._running = False
            self._metrics.live.labels(self.prefix).set(0)

    async def _follow(self) -> None:
        self._listed_since_last_failure = False
        snapshot = await self._store.list_prefix(self.prefix)
        self._records.clear()
        previous_bad, self._bad = self._bad, {}
        for kv in snapshot.items:
            self._take(kv.key, kv, previous_bad)
        self._revision = snapshot.revision
        self._metrics.bad_records.labels(self.prefix).set(len(self._bad))
        await self._deliver()
        self._listed_since_last_failure = True
        self._set_faulted(False)
        self.synced.set()
        # R + 1: the listing already reflects every change up to and including R.
        async for event in self._store.watch_prefix(self.prefix, start_revision=snapshot.revision + 1):
            if event.type is EventType.DELETE:
                self._records.pop(event.key, None)
                self._bad.pop(event.key, None)
            else:
                self._take(event.key, KeyValue(event.key, event.value, event.mod_revision, event.version,
                                               event.lease), self._bad)
            self._revision = event.mod_revision
            self._metrics.bad_records.labels(self.prefix).set(len(self._bad))
            await self._deliver()

    def _take(self, key: str, kv: KeyValue, known_bad: Mapping[str, tuple[int, str]]) -> None:
        try:
            self._records[key] = self._kind.decode(key, kv.value)
            self._bad.pop(key, None)
            return
        except ValidationError as e:
            reason = str(e)
        except Exception as e:  # a decoder bug must cost one record, never the mirror
            reason = f"undecodable ({type(e).__name__}: {e})"
        already_named = known_bad.get(key, (0, ""))[0] == kv.mod_revision  # once per revision, not per listing
        self._records.pop(key, None)
        self._bad[key] = (kv.mod_revision, reason)
        if not already_named:
            self._metrics.bad_revisions.labels(self.prefix).inc()
            log.warning("ignoring %s %r (revision %d): %s", self._kind.what, key, kv.mod_revision, reason,
                        extra={"NEBULA_KEY": key, "NEBULA_PREFIX": self.prefix})
        self._metrics.bad_records.labels(self.prefix).set(len(self._bad))

    async def _deliver(self) -> None:
        if self._on_change is None:
            return
        result = self._on_change(self.state())
        if inspect.isawaitable(result):
            await result

    def _set_faulted(self, faulted: bool) -> None:
        self._faulted = faulted
        self._metrics.live.labels(self.prefix).set(0 if faulted else 1)


class MirrorSet:
    """A service's mirrors, run as its tasks; live while every one of them is."""

    def __init__(self, mirrors: Sequence[Mirror[Any]]) -> None:
        self.mirrors = tuple(mirrors)

    def tasks(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(m.run(), name=f"mirror {m.prefix}") for m in self.mirrors]

    def live(self) -> bool:
        return all(m.live for m in self.mirrors)

    def not_live(self) -> list[str]:
        return [m.prefix for m in self.mirrors if not m.live]

    async def wait_listed(self, timeout_s: float) -> list[str]:
        """Wait up to `timeout_s` for every mirror's first listing; the prefixes still not listed then."""
        waits = [asyncio.create_task(m.synced.wait()) for m in self.mirrors if not m.synced.is_set()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for task in pending:
                task.cancel()
        return [m.prefix for m in self.mirrors if not m.synced.is_set()]
