"""Wiring of `nebula node run`: config, etcd, the unit back-end, the agent loop, /metrics, sd_notify."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula import __version__
from nebula.adapters.nvml import read_gpus
from nebula.adapters.processes import ProcessEngineUnits
from nebula.adapters.sdnotify import Notifier
from nebula.adapters.systemd import SystemdEngineUnits, systemd_is_pid1
from nebula.adapters.units import EngineUnits
from nebula.adapters.watching import LeaseKeeper, mirror_prefix
from nebula.core import keys
from nebula.core.config import NebulaConfig
from nebula.core.model import Gpu, NodeRecord
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.health import EngineHealth
from nebula.services.agent.specfiles import SpecFiles
from nebula.services.runtime import (
    metrics_route,
    node_name,
    notify_ready_and_watch,
    open_store,
    run_tasks_until,
    serve_app,
    stop_on_signals,
)

log = logging.getLogger("nebula.agent")


async def make_units(cfg: NebulaConfig) -> EngineUnits:
    backend = cfg.node.unit_backend
    if backend == "auto":
        backend = "systemd" if systemd_is_pid1() else "process"
    if backend == "systemd":
        return await SystemdEngineUnits.connect()
    return ProcessEngineUnits(argv=[sys.executable, "-m", "nebula"], run_dir=cfg.node.run_dir,
                              log_dir=f"{cfg.node.state_dir}/logs")


def node_record(cfg: NebulaConfig) -> NodeRecord:
    readings, note = read_gpus()
    if note:
        log.info("no GPUs reported: %s", note)
    gpus = tuple(Gpu(index=g.index, name=g.name, memory_total_mib=g.memory_total_mib,
                     memory_used_mib=g.memory_used_mib) for g in readings)
    return NodeRecord(name=node_name(cfg), address=cfg.node.address, port_min=cfg.node.port_min,
                      port_max=cfg.node.port_max, gpus=gpus, agent_version=__version__)


async def run_agent(cfg: NebulaConfig, env: Mapping[str, str]) -> None:
    stop = stop_on_signals()
    registry = CollectorRegistry()
    notifier = Notifier(env)
    store = await open_store(cfg)
    units = await make_units(cfg)
    node = node_record(cfg)
    async with aiohttp.ClientSession() as session:
        agent = NodeAgent(cfg, node, store, units, SpecFiles(cfg.node.run_dir),
                          EngineHealth(session, cfg.engine.health_timeout_s), registry)
        keeper = LeaseKeeper(store, cfg.cluster.lease_ttl_s, agent.on_new_lease)
        await keeper.start()
        app = web.Application()
        app.add_routes([metrics_route(registry)])
        runner = await serve_app(app, cfg.node.host, cfg.node.port)
        log.info("node agent %s up (engines via %s)", node.name, type(units).__name__,
                 extra={"NEBULA_NODE": node.name})
        tasks = [
            asyncio.create_task(keeper.run(), name="lease"),
            asyncio.create_task(mirror_prefix(store, keys.node_placements_prefix(node.name), agent.on_placements),
                                name="placements"),
            asyncio.create_task(agent.run(), name="reconcile"),
            asyncio.create_task(notify_ready_and_watch(notifier, lambda: True,
                                                       lambda: f"{len(agent.placements)} instance(s)"),
                                name="watchdog"),
        ]
        try:
            await run_tasks_until(stop, tasks)
        finally:
            notifier.notify(STOPPING=1)
            await runner.cleanup()
            await units.close()
            await store.close()  # engines keep running: a restarted agent re-adopts them
