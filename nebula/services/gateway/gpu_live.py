"""Each GPU's utilisation and temperature for the console, read from the node agents' own /metrics.

Why not the node record: these figures change every second, and the record is written to etcd only when a
GPU's memory moves (etcd keeps every revision until compaction; a fleet of GPUs reporting each second would
be most of its writes). The agents publish them for Prometheus anyway (agent/gpus.py's families); the console
reads the same samples, from the addresses the agents register under /nebula/services/node/, at most once
every REFRESH_S in a gateway however many consoles are open, each agent within TIMEOUT_S. An agent that does
not answer, or answers garbage, has no live figures on the page, and nothing else changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families

from nebula.core.discovery import ServiceKind, ServiceRecord

log = logging.getLogger(__name__)

REFRESH_S = 5.0
TIMEOUT_S = 2.0
# agent family -> the field the console's node GPUs get
FIELDS = {"nebula_gpu_utilization_ratio": "utilization", "nebula_gpu_temperature_celsius": "temperature_c"}

Figures = dict[str, dict[int, dict[str, float]]]  # node -> GPU index -> field -> value
Fetch = Callable[[str], Awaitable[str]]  # an agent's base URL -> its /metrics text
ListAgents = Callable[[], Awaitable[Iterable[ServiceRecord]]]


def parse_gpu_figures(text: str) -> dict[int, dict[str, float]]:
    """The GPU samples of one agent's exposition, by GPU index. Raises ValueError on text that is not one."""
    out: dict[int, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        field = FIELDS.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            index = sample.labels.get("gpu", "")
            if sample.name == family.name and index.isdigit():
                out.setdefault(int(index), {})[field] = float(sample.value)
    return out


class GpuLive:
    """The latest figures of every agent, refreshed on demand when older than REFRESH_S."""

    def __init__(self, fetch: Fetch, clock: Callable[[], float]) -> None:
        self._fetch, self._clock = fetch, clock
        self._figures: Figures = {}
        self._at = float("-inf")
        self._lock = asyncio.Lock()
        self._failing: set[str] = set()  # agents whose last read failed: logged once until they answer

    async def figures(self, list_services: ListAgents) -> Figures:
        """The figures, read again (the service records, then every agent) when older than REFRESH_S."""
        async with self._lock:  # consoles opened together: one read of the agents, not one each
            if self._clock() - self._at >= REFRESH_S:
                agents = [s for s in await list_services() if s.service is ServiceKind.NODE]
                read = await asyncio.gather(*(self._read(s) for s in agents))
                self._figures = {s.node: f for s, f in zip(agents, read, strict=True) if f is not None}
                self._at = self._clock()
            return self._figures

    async def _read(self, agent: ServiceRecord) -> dict[int, dict[str, float]] | None:
        try:
            found = parse_gpu_figures(await self._fetch(f"{agent.scheme}://{agent.address}"))
        except Exception as e:  # foreign text: the parser fails in more ways than ValueError
            if agent.node not in self._failing:
                self._failing.add(agent.node)
                log.warning("console: no GPU figures from node %s's agent at %s (%s)", agent.node, agent.address,
                            e or type(e).__name__, extra={"NEBULA_NODE": agent.node})
            return None
        self._failing.discard(agent.node)
        return found


def annotate(nodes: list[dict[str, object]], figures: Figures) -> None:
    """Each node's GPUs (as the fleet shows them) get `utilization` and `temperature_c` where its agent said."""
    for node in nodes:
        gpus, live = node.get("gpus"), figures.get(str(node.get("name")), {})
        if isinstance(gpus, list):
            for gpu in gpus:
                if isinstance(gpu, dict) and isinstance(gpu.get("index"), int):
                    gpu.update(live.get(gpu["index"], {}))
