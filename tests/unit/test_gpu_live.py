"""The console's live GPU figures (services/gateway/gpu_live.py): read over HTTP from agents serving the agent's
own GPU families (agent/gpus.py, the exposition Prometheus scrapes), at most once per refresh however many
consoles ask, with an agent that is down or answers garbage left out (one warning) and nothing else changed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from nebula.adapters.engine_metrics import fetch_metrics_text
from nebula.adapters.nvml import GpuReading
from nebula.core.discovery import ServiceKind, ServiceRecord
from nebula.services.agent.gpus import gpu_families
from nebula.services.gateway.gpu_live import REFRESH_S, TIMEOUT_S, GpuLive, annotate, parse_gpu_figures
from nebula.services.runtime import metrics_route
from tests.harness.ports import free_port

GIB = 2**30
READINGS = (
    GpuReading(index=0, name="NVIDIA H100 80GB HBM3", memory_total_bytes=80 * GIB, memory_used_bytes=40 * GIB,
               uuid="GPU-a", utilization=0.37, temperature_c=61.0, power_w=350.0, power_limit_w=700.0),
    GpuReading(index=1, name="NVIDIA H100 80GB HBM3", memory_total_bytes=80 * GIB, memory_used_bytes=0,
               uuid="GPU-b", utilization=None, temperature_c=34.0),  # utilisation unsupported (MIG)
)


class Readings(Collector):
    def collect(self) -> Iterator[object]:  # type: ignore[override]
        yield from gpu_families("n1", READINGS)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def agent_exposition() -> str:
    registry = CollectorRegistry()
    registry.register(Readings())
    return generate_latest(registry).decode()


def test_the_agents_gpu_families_read_back_by_index() -> None:
    assert parse_gpu_figures(agent_exposition()) == {0: {"utilization": 0.37, "temperature_c": 61.0},
                                                     1: {"temperature_c": 34.0}}
    assert parse_gpu_figures("") == {}, "an agent without GPUs"
    with pytest.raises(ValueError):
        parse_gpu_figures("<html>not metrics</html>")


@asynccontextmanager
async def agents() -> AsyncIterator[tuple[list[ServiceRecord], list[str]]]:
    """A real agent /metrics (n1), one answering garbage (n2), one that is not there (n3), a gateway (ignored)."""
    registry = CollectorRegistry()
    registry.register(Readings())
    seen: list[str] = []

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.host)
        return await handler(request)

    good = web.Application(middlewares=[count])
    good.add_routes([metrics_route(registry)])
    async def garbage(_: web.Request) -> web.Response:
        return web.Response(text='nebula_gpu_temperature_celsius{gpu="0"} hot')

    bad = web.Application(middlewares=[count])
    bad.add_routes([web.get("/metrics", garbage)])
    runners = [web.AppRunner(good), web.AppRunner(bad)]
    ports = []
    for runner in runners:
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ports.append(port)
    services = [ServiceRecord(ServiceKind.NODE, "n1", f"127.0.0.1:{ports[0]}"),
                ServiceRecord(ServiceKind.NODE, "n2", f"127.0.0.1:{ports[1]}"),
                ServiceRecord(ServiceKind.NODE, "n3", f"127.0.0.1:{free_port()}"),
                ServiceRecord(ServiceKind.GATEWAY, "n1", f"127.0.0.1:{ports[1]}")]
    try:
        yield services, seen
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_figures_come_from_the_agents_that_answer_once_per_refresh(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    async with agents() as (services, seen), aiohttp.ClientSession() as http:
        live = GpuLive(lambda url: fetch_metrics_text(http, url, TIMEOUT_S), clock)
        listings = []

        async def listed() -> list[ServiceRecord]:  # the service records, as the feed reads them from etcd
            listings.append(clock.now)
            return services

        with caplog.at_level(logging.WARNING, "nebula.services.gateway.gpu_live"):
            together = await asyncio.gather(*(live.figures(listed) for _ in range(5)))  # five consoles at once
        assert all(f == {"n1": {0: {"utilization": 0.37, "temperature_c": 61.0}, 1: {"temperature_c": 34.0}}}
                   for f in together)
        assert len(seen) == 2, "one read of each agent (the gateway's record is not an agent's)"
        warned = [r.message for r in caplog.records]
        assert len(warned) == 2 and any("node n2" in m for m in warned) and any("node n3" in m for m in warned)

        clock.now += REFRESH_S - 0.1
        await live.figures(listed)
        assert len(seen) == 2 and len(listings) == 1, "within the refresh: what was read, nothing read again"
        clock.now += 0.1
        caplog.clear()
        with caplog.at_level(logging.WARNING, "nebula.services.gateway.gpu_live"):
            await live.figures(listed)
        assert len(seen) == 4 and not caplog.records, "read again; the failing agents warned only once"


def test_a_nodes_gpus_get_what_its_agent_said() -> None:
    nodes: list[dict[str, object]] = [
        {"name": "n1", "gpus": [{"index": 0, "name": "H100"}, {"index": 1, "name": "H100"}]},
        {"name": "n2", "gpus": [{"index": 0, "name": "L4"}]}, {"name": "cpu", "gpus": []}]
    annotate(nodes, {"n1": {0: {"utilization": 0.5, "temperature_c": 70.0}}})
    assert nodes[0]["gpus"] == [{"index": 0, "name": "H100", "utilization": 0.5, "temperature_c": 70.0},
                                {"index": 1, "name": "H100"}]
    assert nodes[1]["gpus"] == [{"index": 0, "name": "L4"}], "no answer from its agent: memory figures only"
