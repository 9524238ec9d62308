"""The agent's drain of removed replicas (core/engine_drain.py decides; this reads the engines' load).

`EngineDrain.hold()` gets the running engines that no placement names any more and answers which of them must
not be stopped yet; the agent's reconcile plan leaves those running (they are reported DRAINING meanwhile).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp

from nebula.adapters.engine_metrics import EngineMetricsError, fetch_engine_load
from nebula.core.engine_drain import keep_draining

log = logging.getLogger("nebula.agent")
Busy = Callable[[str], Awaitable[int | None]]
"""Requests running or waiting on the engine at an endpoint; None when unreadable."""


class EngineDrain:
    def __init__(self, busy: Busy, *, notice_s: float, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.busy = busy
        self.notice_s = notice_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._removed_at: dict[str, float] = {}

    async def hold(self, unplaced: Mapping[str, str]) -> frozenset[str]:
        """`unplaced`: instance -> endpoint of each running engine with no placement. The ones to keep running."""
        now = self.clock()
        self._removed_at = {i: self._removed_at.get(i, now) for i in unplaced}
        held = set()
        for inst, endpoint in sorted(unplaced.items()):
            removed_at = self._removed_at[inst]
            busy = await self.busy(endpoint) if now - removed_at >= self.notice_s else None
            if keep_draining(removed_at, now, busy, notice_s=self.notice_s, timeout_s=self.timeout_s):
                held.add(inst)
            elif busy:
                log.warning("engine %s still has %d request(s) after %.0f s of draining ([node] drain_timeout_s): "
                            "stopping it", inst, busy, self.timeout_s, extra={"NEBULA_INSTANCE": inst})
        return frozenset(held)


def engine_busy(session: aiohttp.ClientSession, timeout_s: float) -> Busy:
    """Busy read from the engine's own /metrics (vLLM's running and waiting gauges)."""
    async def busy(endpoint: str) -> int | None:
        try:
            load = await fetch_engine_load(session, endpoint, timeout_s)
        except EngineMetricsError:
            return None
        return int(load.running + load.waiting)

    return busy
