"""Per-GPU series on the agent's /metrics: utilisation, memory, temperature and power, from NVML.

A sampler reads the GPUs every few seconds in a worker thread (an NVML call can hang on a GPU in a bad
state; the agent's event loop, and with it the watchdog, must not hang with it) and the collector shows
its latest readings at scrape time. A node without GPUs (no driver, no NVML) has no GPU series at all and
says why in one log line, again only when the reason changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import NoReturn

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula.adapters.nvml import MIB, GpuReader, GpuReading
from nebula.adapters.procinfo import read_process
from nebula.core.gpu_release import ReleaseTracker
from nebula.core.gpu_usage import GpuProcess, GpuUsage, moved, split_usage
from nebula.core.model import Gpu
from nebula.core.units import UnitState, UnitStatus

log = logging.getLogger("nebula.agent")
LABELS = ["node", "gpu", "uuid", "name"]
Sleep = Callable[[float], Awaitable[None]]
ProcessReader = Callable[[int, int], GpuProcess]


@dataclass(frozen=True)
class EngineView:
    """What the agent knows of its engines, handed to the sampler after each of its passes."""

    running: frozenset[str] = frozenset()
    """Instances whose unit is not down."""
    sessions: Mapping[int, str] = field(default_factory=dict)
    """Session id (an engine's main pid: each engine leads its own session) -> instance."""
    declared_mib: Mapping[int, int] = field(default_factory=dict)
    """Per GPU, the memory this node's placements declared on it."""
    placed: frozenset[str] | None = None
    """Instances this node's placements still want; None: all running ones. A running engine outside it (one
    draining after an unload or a move) holds memory its placement no longer counts: outside use, until it
    stops, so a new replica is not placed onto memory that is not free yet."""

    def counted(self) -> frozenset[str]:
        """Running engines whose memory placement already counts (through their placements)."""
        return self.running if self.placed is None else self.running & self.placed


def engine_view(units: Mapping[str, UnitStatus], declared_mib: Mapping[int, int] | None = None,
                placed: Collection[str] | None = None) -> EngineView:
    """The sampler's view of the engines from the units the back-end lists."""
    return EngineView(running=frozenset(i for i, u in units.items()
                                        if u.state not in (UnitState.INACTIVE, UnitState.FAILED)),
                      sessions={u.main_pid: i for i, u in units.items() if u.main_pid > 0},
                      declared_mib=dict(declared_mib or {}), placed=None if placed is None else frozenset(placed))


class GpuSampler:
    def __init__(self, read: GpuReader, node: str, *, tracker: ReleaseTracker | None = None,
                 read_proc: ProcessReader = read_process, clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self.node = node
        self.readings: tuple[GpuReading, ...] = ()
        self.usage: tuple[GpuUsage, ...] = ()
        self.engines = EngineView()
        self.tracker = tracker
        self._read_proc = read_proc
        self._clock = clock
        self._sessions: dict[int, str] = {}
        self._warned: set[tuple[str, int]] = set()
        self._note: str | None = None

    def sample(self) -> None:
        """One reading of every GPU (blocking: run it in a thread)."""
        readings, note = self._read()
        if note != self._note and note:
            log.info("no GPUs on this node: %s", note, extra={"NEBULA_NODE": self.node})
        self._note = note
        view = self.engines
        self.usage = self._usage(readings, view)
        self.readings = readings
        if self.tracker is not None:
            self.tracker.observe(self._clock(), self.usage, view.running)
            overdue = self.tracker.overdue()
            for r in overdue:
                if (r.instance, r.gpu) in self._warned:
                    continue  # once per release, not once per sample
                log.warning("GPU %d: engine %s stopped %.0f s ago and %d MiB of its memory is not back", r.gpu,
                            r.instance, self._clock() - r.since, r.left_mib,
                            extra={"NEBULA_NODE": self.node, "NEBULA_INSTANCE": r.instance})
            self._warned = {(r.instance, r.gpu) for r in overdue}

    def _usage(self, readings: tuple[GpuReading, ...], view: EngineView) -> tuple[GpuUsage, ...]:
        # Sessions of engines that stopped are remembered while processes of theirs are on a GPU: those are
        # the workers an engine left behind, still Nebula's (and the release tracker's to report).
        sessions = {**self._sessions, **view.sessions}
        seen: set[int] = set()
        usage = []
        for g in readings:
            procs = None if g.processes is None else [self._read_proc(p.pid, p.used_bytes // MIB)
                                                      for p in g.processes]
            seen.update(p.session for p in procs or () if p.session is not None)
            usage.append(split_usage(g.index, g.memory_total_mib, g.memory_used_mib, procs, sessions))
        self._sessions = {s: i for s, i in sessions.items() if s in seen or s in view.sessions}
        return tuple(usage)

    def outside_mib(self) -> dict[int, int]:
        """Per GPU, the memory used outside Nebula (or left by stopped engines) at the latest reading."""
        view = self.engines
        return {u.index: u.outside_mib(view.declared_mib.get(u.index, 0), view.counted()) for u in self.usage}

    async def run(self, interval_s: float, sleep: Sleep = asyncio.sleep) -> NoReturn:
        while True:
            try:
                await asyncio.to_thread(self.sample)
            except Exception:  # a failed read must not end the sampling: keep the last readings, try again
                log.exception("reading the GPUs failed")
            await sleep(interval_s)


def gpu_records(gpus: tuple[Gpu, ...], readings: tuple[GpuReading, ...], outside: Mapping[int, int],
                step_mib: int) -> tuple[Gpu, ...] | None:
    """The node record's GPUs with the latest memory figures, or None when the memory used outside Nebula
    moved by less than `step_mib` on every GPU since the record was written (no write then)."""
    now = {g.index: outside.get(g.index, g.memory_outside_mib) for g in gpus}
    if not moved({g.index: g.memory_outside_mib for g in gpus}, now, step_mib):
        return None
    used = {r.index: r.memory_used_mib for r in readings}
    return tuple(replace(g, memory_outside_mib=now[g.index], memory_used_mib=used.get(g.index, g.memory_used_mib))
                 for g in gpus)


def gpu_record(reading: GpuReading, outside_mib: int) -> Gpu:
    """A node record's GPU from an NVML reading."""
    return Gpu(index=reading.index, name=reading.name, memory_total_mib=reading.memory_total_mib,
               memory_used_mib=reading.memory_used_mib, memory_outside_mib=outside_mib,
               link_group=reading.link_group)


def _family(name: str, doc: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=LABELS)


def gpu_families(node: str, readings: tuple[GpuReading, ...]) -> list[Metric]:
    """The NVML families for `readings` (none at all without GPUs); a reading a GPU lacks has no sample."""
    if not readings:
        return []
    util = _family("nebula_gpu_utilization_ratio", "Fraction of time the GPU was busy over NVML's last sample period")
    used = _family("nebula_gpu_memory_used_bytes", "GPU memory in use")
    total = _family("nebula_gpu_memory_total_bytes", "GPU memory installed")
    temp = _family("nebula_gpu_temperature_celsius", "GPU core temperature")
    power = _family("nebula_gpu_power_watts", "GPU power draw")
    limit = _family("nebula_gpu_power_limit_watts", "GPU power limit in force")
    for g in readings:
        labels = [node, str(g.index), g.uuid, g.name]
        used.add_metric(labels, g.memory_used_bytes)
        total.add_metric(labels, g.memory_total_bytes)
        for family, value in ((util, g.utilization), (temp, g.temperature_c), (power, g.power_w),
                              (limit, g.power_limit_w)):
            if value is not None:
                family.add_metric(labels, value)
    return [util, used, total, temp, power, limit]


class GpuCollector(Collector):
    def __init__(self, sampler: GpuSampler) -> None:
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        s = self._sampler
        readings = s.readings
        yield from gpu_families(s.node, readings)
        if not readings:
            return
        outside = _family("nebula_gpu_memory_outside_bytes", "GPU memory in use by processes that are not "
                          "Nebula's engines (and by the driver): placement leaves it alone")
        by_index = s.outside_mib()
        unreleased = _family("nebula_agent_gpu_memory_unreleased_bytes", "GPU memory that engines stopped "
                             "longer ago than [node] gpu_release_timeout_s have not given back")
        left = s.tracker.unreleased_mib([g.index for g in readings]) if s.tracker is not None else {}
        for g in readings:
            labels = [s.node, str(g.index), g.uuid, g.name]
            if g.index in by_index:
                outside.add_metric(labels, by_index[g.index] * MIB)
            unreleased.add_metric(labels, left.get(g.index, 0) * MIB)
        overdue = CounterMetricFamily("nebula_agent_gpu_memory_release_overdue", "Stopped engines whose GPU "
                                      "memory did not come back within [node] gpu_release_timeout_s",
                                      labels=["node"])
        overdue.add_metric([s.node], s.tracker.overdue_total if s.tracker is not None else 0)
        yield from (outside, unreleased, overdue)
