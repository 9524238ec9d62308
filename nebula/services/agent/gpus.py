"""Per-GPU series on the agent's /metrics: utilisation, memory, temperature and power, from NVML.

A sampler reads the GPUs every few seconds in a worker thread (an NVML call can hang on a GPU in a bad
state; the agent's event loop, and with it the watchdog, must not hang with it) and the collector shows
its latest readings at scrape time. A node without GPUs (no driver, no NVML) has no GPU series at all and
says why in one log line, again only when the reason changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import NoReturn

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula.adapters.nvml import GpuReader, GpuReading

log = logging.getLogger("nebula.agent")
LABELS = ["node", "gpu", "uuid", "name"]
Sleep = Callable[[float], Awaitable[None]]


class GpuSampler:
    def __init__(self, read: GpuReader, node: str) -> None:
        self._read = read
        self.node = node
        self.readings: tuple[GpuReading, ...] = ()
        self._note: str | None = None

    def sample(self) -> None:
        """One reading of every GPU (blocking: run it in a thread)."""
        readings, note = self._read()
        if note != self._note and note:
            log.info("no GPUs on this node: %s", note, extra={"NEBULA_NODE": self.node})
        self._note = note
        self.readings = readings

    async def run(self, interval_s: float, sleep: Sleep = asyncio.sleep) -> NoReturn:
        while True:
            try:
                await asyncio.to_thread(self.sample)
            except Exception:  # a failed read must not end the sampling: keep the last readings, try again
                log.exception("reading the GPUs failed")
            await sleep(interval_s)


def _family(name: str, doc: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=LABELS)


def gpu_families(node: str, readings: tuple[GpuReading, ...]) -> list[Metric]:
    """The GPU families for `readings` (none at all without GPUs); a reading a GPU lacks has no sample."""
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
        yield from gpu_families(self._sampler.node, self._sampler.readings)
