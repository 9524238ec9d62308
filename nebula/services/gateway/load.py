"""The engines' load as the gateway last read it: a book of samples and the background poll that fills it.

The poll runs beside the data path, never in it: a request reads the book (a dict lookup per candidate),
it never waits for a poll. A replica whose poll fails or times out stays routable: its last sample counts
until it is `max_age_s` old (a busy engine is often the one slow to answer /metrics, and forgetting its
load at once would make it look idle), then its load is unknown and only in-flight requests count.

The same samples feed the token counters per model (TokenBook): the engines count tokens themselves,
so the gateway adds up the increases of their counters and never parses a response for usage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import NoReturn

from nebula.adapters.engine_metrics import EngineMetricsError
from nebula.core.engine_load import EngineLoad

log = logging.getLogger(__name__)

Fetch = Callable[[str], Awaitable[EngineLoad]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Sample:
    load: EngineLoad
    at: float  # the poller's clock when it was read


def counter_increase(before: float, now: float) -> float:
    """How much a counter grew between two readings. A smaller reading means its engine restarted and
    counts from zero again, so the whole new reading is the increase: never a negative one."""
    return now - before if now >= before else now


class TokenBook:
    """Tokens per model, summed from the increases of each engine's own counters between two polls.

    An engine's first reading is only a baseline: what it counted before this gateway first saw it is
    not counted (after a gateway restart, counting it would report every token the engine ever made as
    new). So each gateway's counters report the engines' tokens since it started watching them, every
    engine's: with several gateways, read one of them (or `max`), never their sum. Only READY replicas
    are polled, so the last tokens of a draining engine are not counted.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[str, float | None, float | None]] = {}  # endpoint -> (model, prompt, gen)
        self.prompt: dict[str, float] = {}
        self.generation: dict[str, float] = {}

    def observe(self, endpoint: str, model: str, load: EngineLoad) -> None:
        last = self._last.get(endpoint)
        if last is None or last[0] != model:
            last = (model, None, None)  # first sight, or the port now serves another model: a baseline
        self._last[endpoint] = (model, load.prompt_tokens, load.generation_tokens)
        _add(self.prompt, model, last[1], load.prompt_tokens)
        _add(self.generation, model, last[2], load.generation_tokens)


def _add(totals: dict[str, float], model: str, before: float | None, now: float | None) -> None:
    if now is None:
        return  # the engine does not expose this counter (or not yet)
    totals[model] = totals.get(model, 0.0) + (0.0 if before is None else counter_increase(before, now))


class LoadBook:
    """Latest sample per endpoint. Only the poller writes it, so readers need no locking on one loop."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._samples: dict[str, Sample] = {}
        # The loads alone, kept beside the samples so that a pick reads them without building a dict.
        self._loads: dict[str, EngineLoad] = {}
        self.failures = 0  # polls that failed, all endpoints together (for /metrics)
        self._models: Mapping[str, str] = {}  # endpoint -> model, from the replica table
        self.tokens = TokenBook()

    def assign_models(self, models: Mapping[str, str]) -> None:
        """Which model each polled endpoint serves (the replica table sets it), for the token counters."""
        self._models = models

    def record(self, endpoint: str, load: EngineLoad, now: float) -> None:
        self._samples[endpoint] = Sample(load, now)
        self._loads[endpoint] = load
        model = self._models.get(endpoint)
        if model is not None:
            self.tokens.observe(endpoint, model, load)

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
