"""The engines' load as the gateway last read it: a book of samples and the background poll that fills it.

The poll runs beside the data path, never in it: a request reads the book (a dict lookup per candidate),
it never waits for a poll. A replica whose poll fails or times out stays routable: its last sample counts
until it is `max_age_s` old (a busy engine is often the one slow to answer /metrics, and forgetting its
load at once would make it look idle), then its load is unknown and only in-flight requests count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import NoReturn

from nebula.adapters.engine_metrics import EngineLoad, EngineMetricsError

log = logging.getLogger(__name__)

Fetch = Callable[[str], Awaitable[EngineLoad]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Sample:
    load: EngineLoad
    at: float  # the poller's clock when it was read


class LoadBook:
    """Latest sample per endpoint. Only the poller writes it, so readers need no locking on one loop."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._samples: dict[str, Sample] = {}
        # The loads alone, kept beside the samples so that a pick reads them without building a dict.
        self._loads: dict[str, EngineLoad] = {}
        self.failures = 0  # polls that failed, all endpoints together (for /metrics)

    def record(self, endpoint: str, load: EngineLoad, now: float) -> None:
        self._samples[endpoint] = Sample(load, now)
        self._loads[endpoint] = load

    def failed(self, endpoint: str, now: float) -> None:
        """A poll of `endpoint` failed: its last sample stays until it is too old to trust."""
        self.failures += 1
        sample = self._samples.get(endpoint)
        if sample is not None and now - sample.at >= self.max_age_s:
            self._forget(endpoint)

    def retain(self, endpoints: Collection[str]) -> None:
        """Forget endpoints that are no longer polled (left READY): no stale series, no stale load."""
        for endpoint in [e for e in self._samples if e not in endpoints]:
            self._forget(endpoint)

    def _forget(self, endpoint: str) -> None:
        del self._samples[endpoint]
        del self._loads[endpoint]

    def loads(self) -> Mapping[str, EngineLoad]:
        return self._loads

    def sample(self, endpoint: str) -> Sample | None:
        return self._samples.get(endpoint)


async def _poll_one(fetch: Fetch, endpoint: str) -> EngineLoad | None:
    try:
        return await fetch(endpoint)
    except EngineMetricsError as e:
        log.debug("load poll of %s failed: %s", endpoint, e)
        return None


async def poll_round(endpoints: Collection[str], book: LoadBook, fetch: Fetch, clock: Clock) -> None:
    """Poll every endpoint concurrently (a slow one delays none of the others) and record the results."""
    polled = sorted(endpoints)
    results = await asyncio.gather(*(_poll_one(fetch, e) for e in polled))
    now = clock()
    book.retain(endpoints)
    for endpoint, load in zip(polled, results, strict=True):
        if load is None:
            book.failed(endpoint, now)
        else:
            book.record(endpoint, load, now)


async def poll_loads(endpoints: Callable[[], Collection[str]], book: LoadBook, fetch: Fetch, interval_s: float,
                     clock: Clock, sleep: Sleep = asyncio.sleep) -> NoReturn:
    """Poll the endpoints `endpoints()` names every `interval_s` (start to start) until cancelled.

    A round that raises unexpectedly is logged and the next one goes on: a dead poller would freeze
    the last samples in place, which is worse than any single failed round.
    """
    while True:
        started = clock()
        try:
            await poll_round(endpoints(), book, fetch, clock)
        except Exception:
            log.exception("load poll round failed")
        await sleep(max(0.0, interval_s - (clock() - started)))
