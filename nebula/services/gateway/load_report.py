"""This gateway process's load per model, for the scheduler's autoscaling and idle unload (/nebula/load/<reporter>).

Two halves:
- `LoadAccounting`, on the request path: a counter update per request and a clock read (time.time reads the
  vDSO, no system call), nothing else; no etcd call and no lock (one event loop per process);
- `publish_loads`, beside it: every `gateway.load_report_s` it builds a LoadReport from those counters and the
  engine figures the load poll already keeps (load.py's LoadBook), and puts it under a lease of this process's
  own, so the report leaves with the process (at once on a clean stop, within the lease TTL after a crash).

Only inference requests are counted (serve_inference calls `begin` and `end`): health checks, /metrics scrapes, status
and admin calls never touch these counters, so they never keep an idle model awake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import NoReturn

from nebula.adapters.watching import LeaseKeeper, Sleep
from nebula.core.elastic import REPORTER_RE, LoadReport, ModelLoad
from nebula.core.routing import Replica
from nebula.core.store import Store
from nebula.errors import TemporaryError
from nebula.services.cluster.writes import ClusterWrites
from nebula.services.gateway.load import Clock, LoadBook

log = logging.getLogger(__name__)


def reporter_name(node: str, pid: int) -> str:
    """`<node>.<pid>`, spelled as REPORTER_RE allows (a host name may carry capitals or other characters)."""
    name = re.sub(r"[^a-z0-9._-]", "-", node.lower()).lstrip("._-")[:100] or "gateway"
    name = f"{name}.{pid}"
    assert REPORTER_RE.fullmatch(name), name
    return name


class LoadAccounting:
    """Per model: inference requests in flight through this process, requests held for a wake, and the
    wall-clock time of the last inference request (set when one arrives and again when it ends, so a model
    whose one long stream just ended is not idle at once)."""

    def __init__(self, wall: Clock = time.time) -> None:
        self._wall = wall
        self.inflight: dict[str, int] = {}
        self.held: dict[str, int] = {}
        self.last_request: dict[str, float] = {}

    def begin(self, model: str) -> None:
        """One inference request to `model` goes in flight (a stream: until it ends); pair with `end`. Plain
        calls rather than a context manager: this is on every request's path (about 0.4 us the pair)."""
        inflight = self.inflight
        inflight[model] = inflight.get(model, 0) + 1
        self.last_request[model] = self._wall()

    def end(self, model: str) -> None:
        self.inflight[model] -= 1
        self.last_request[model] = self._wall()

    @contextmanager
    def holding(self, model: str) -> Iterator[None]:
        """Count one request held while `model` wakes, for the block."""
        self.held[model] = self.held.get(model, 0) + 1
        self.last_request[model] = self._wall()
        try:
            yield
        finally:
            self.held[model] -= 1

    def held_total(self) -> int:
        return sum(self.held.values())


def model_loads(acct: LoadAccounting, ready: Mapping[str, tuple[Replica, ...]], book: LoadBook,
                models: Collection[str]) -> dict[str, ModelLoad]:
    """Each model's load: this process's counts, and the engines' figures summed over its READY replicas
    (the fullest replica's KV cache). `models`: the loaded models (the view); a model no longer loaded is
    left out unless requests to it are still in flight or held."""
    names = set(models) | set(ready) | {m for m, n in acct.inflight.items() if n} | {
        m for m, n in acct.held.items() if n}
    out: dict[str, ModelLoad] = {}
    for model in sorted(names):
        waiting = running = 0.0
        kv = 0.0
        for replica in ready.get(model, ()):
            sample = book.sample(replica.endpoint)
            if sample is not None:
                waiting += sample.load.waiting
                running += sample.load.running
                kv = max(kv, sample.load.kv_cache_usage)
        out[model] = ModelLoad(inflight=max(0, acct.inflight.get(model, 0)), held=max(0, acct.held.get(model, 0)),
                               waiting=round(waiting), running=round(running), kv_cache=min(1.0, max(0.0, kv)),
                               last_request=acct.last_request.get(model, 0.0))
    return out


async def publish_loads(store: Store, writes: ClusterWrites, report: Callable[[], LoadReport], interval_s: float,
                        ttl_s: int, sleep: Sleep = asyncio.sleep) -> NoReturn:
    """Put `report()` every `interval_s` under a lease of this process's own, until cancelled; then revoke the
    lease so the report vanishes at once. A lost lease is replaced (and the report written under the new one)
    by the LeaseKeeper; a failed put is logged and the next interval tries again."""

    async def write(lease: int) -> None:
        await writes.publish_load(report(), lease)

    keeper = LeaseKeeper(store, ttl_s, write, sleep=sleep)
    keeping = asyncio.create_task(keeper.run(), name="gateway-load-lease")
    try:
        while True:
            await sleep(interval_s)
            if keeper.lease:
                try:
                    await write(keeper.lease)
                except TemporaryError as e:
                    log.warning("load report not published (%r); trying again in %.1fs", e, interval_s)
    finally:
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
        with contextlib.suppress(TemporaryError):
            await keeper.revoke()
