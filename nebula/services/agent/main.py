"""Wiring of `nebula node run`: config, etcd, the unit back-end, the agent loop, /metrics, sd_notify."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

from nebula import __version__
from nebula.adapters.engine_log_sources import FileLogSource, JournalLogSource
from nebula.adapters.engine_lora import EngineLoraClient
from nebula.adapters.engine_runtimes import installed_runtimes
from nebula.adapters.engine_sleep import EngineSleepClient
from nebula.adapters.nvml import GpuReading, NvmlReader
from nebula.adapters.processes import ProcessEngineUnits
from nebula.adapters.systemd import SystemdEngineUnits, system_bus_address, systemd_is_pid1
from nebula.adapters.watching import LeaseKeeper
from nebula.core import keys, records
from nebula.core.config import NebulaConfig
from nebula.core.discovery import ServiceKind, advertised_address
from nebula.core.engine_logs import EngineLogSource, LogAccess
from nebula.core.gpu_release import ReleaseTracker
from nebula.core.model import NodeRecord, dumps
from nebula.core.units import EngineUnits
from nebula.services.agent import logs_api
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.drain import EngineDrain, engine_busy
from nebula.services.agent.gpus import GpuCollector, GpuSampler, engine_view, gpu_record
from nebula.services.agent.health import EngineHealth
from nebula.services.agent.specfiles import SpecFiles
from nebula.services.cluster.mirror import Mirror, MirrorMetrics, MirrorSet
from nebula.services.registration import keep_record, keep_registered, service_record
from nebula.services.runtime import (
    metrics_route,
    node_name,
    run_tasks_until,
    serve_until_cancelled,
    service_context,
    settle_heap,
)

log = logging.getLogger("nebula.agent")
# One runtime-LoRA call to an engine (a load reads the adapter's weights from disk).
LORA_TIMEOUT_S = 30.0
# Sleep at level 1 copies the weights to host memory, and a wake copies them back: seconds to a minute.
SLEEP_TIMEOUT_S = 120.0


def make_units(cfg: NebulaConfig, env: Mapping[str, str]) -> EngineUnits:
    backend = cfg.node.unit_backend
    if backend == "auto":
        backend = "systemd" if systemd_is_pid1() else "process"
    if backend == "systemd":
        return SystemdEngineUnits(system_bus_address(env))
    return process_units(cfg, env)


def process_units(cfg: NebulaConfig, env: Mapping[str, str]) -> ProcessEngineUnits:
    """Engines as children in their own sessions, running `python -m nebula engine run <instance>`; as
    engine.user where the agent is root (a user that cannot read the agent's credentials), else as the
    agent's own user: a process without root cannot become another (docs/security.md)."""
    user = cfg.engine.user if os.geteuid() == 0 else ""
    return ProcessEngineUnits([sys.executable, "-m", "nebula"], Path(cfg.node.run_dir),
                              Path(cfg.node.state_dir) / "logs", env, user=user,
                              home=Path(cfg.node.state_dir) / "engine-home")


def log_source(cfg: NebulaConfig, units: EngineUnits) -> EngineLogSource:
    """Where `nebula logs` reads engine logs on this node: the journal under systemd, else the agent's files."""
    if isinstance(units, ProcessEngineUnits):
        return FileLogSource(Path(cfg.node.state_dir) / "logs")
    return JournalLogSource()


def log_access(cfg: NebulaConfig, node: str) -> LogAccess:
    """This start's log credential (core/engine_logs.py): random, in this process and etcd only."""
    return LogAccess(node=node, address=advertised_address(cfg.node.host, cfg.node.port, cfg.node.address),
                     token=secrets.token_urlsafe(32))


def node_record(cfg: NebulaConfig, readings: tuple[GpuReading, ...], outside_mib: Mapping[int, int]
                ) -> NodeRecord:
    gpus = tuple(gpu_record(g, outside_mib.get(g.index, 0)) for g in readings)
    return NodeRecord(name=node_name(cfg), address=cfg.node.address, port_min=cfg.node.port_min,
                      port_max=cfg.node.port_max, gpus=gpus, agent_version=__version__,
                      labels={k: v for k, _, v in (label.partition("=") for label in cfg.node.labels)},
                      runtimes=installed_runtimes(cfg.engine))


async def run_agent(cfg: NebulaConfig, env: Mapping[str, str]) -> None:
    async with service_context(cfg, env) as svc, aiohttp.ClientSession() as session:
        units = make_units(cfg, env)
        gpus = GpuSampler(NvmlReader(), node_name(cfg),
                          tracker=ReleaseTracker(cfg.node.gpu_release_timeout_s, cfg.node.gpu_release_slack_mib))
        # The engines already running (a restarted agent) own their memory from the first reading on.
        gpus.engines = engine_view(await units.list())
        gpus.sample()  # the inventory for the node record; it logs why when there are no GPUs
        svc.registry.register(GpuCollector(gpus))
        node = node_record(cfg, gpus.readings, gpus.outside_mib())
        agent = NodeAgent(cfg, node, svc.store, units, SpecFiles(cfg.node.run_dir),
                          EngineHealth(session, cfg.node.health_timeout_s), svc.registry,
                          runtimes=lambda: installed_runtimes(cfg.engine), gpus=gpus,
                          lora=EngineLoraClient(session, LORA_TIMEOUT_S),
                          sleep=EngineSleepClient(session, SLEEP_TIMEOUT_S),
                          drain=EngineDrain(engine_busy(session, cfg.node.health_timeout_s),
                                            notice_s=cfg.node.drain_notice_s, timeout_s=cfg.node.drain_timeout_s))
        keeper = LeaseKeeper(svc.store, cfg.cluster.lease_ttl_s, agent.on_new_lease)
        await agent.on_new_lease(await keeper.start())
        app = web.Application()
        access = log_access(cfg, node.name)
        app[logs_api.ENGINE_LOGS] = logs_api.EngineLogs(log_source(cfg, units), access.token)
        app.add_routes([metrics_route(svc.registry), *logs_api.routes()])
        log.info("node agent %s up (engines via %s)", node.name, type(units).__name__,
                 extra={"NEBULA_NODE": node.name})
        metrics = MirrorMetrics(svc.registry)
        mirrors = MirrorSet([
            Mirror(svc.store, records.PLACEMENTS, metrics, prefix=keys.node_placements_prefix(node.name),
                   on_change=agent.on_placements),
            Mirror(svc.store, records.PULLS, metrics, prefix=keys.node_pulls_prefix(node.name),
                   on_change=agent.on_pulls),
            Mirror(svc.store, records.ADAPTERS, metrics, on_change=agent.on_adapters),
        ])
        tasks = [
            asyncio.create_task(keeper.run(), name="lease"),
            *mirrors.tasks(),
            asyncio.create_task(agent.run(), name="reconcile"),
            *([asyncio.create_task(gpus.run(cfg.node.gpu_sample_s), name="gpus")] if cfg.node.gpu_sample_s > 0 else []),
            asyncio.create_task(keep_registered(svc.store, service_record(cfg, ServiceKind.NODE, node.name),
                                                cfg.cluster.lease_ttl_s), name="registration"),
            asyncio.create_task(keep_record(svc.store, keys.log_access_key(node.name), dumps(access.to_dict()),
                                            cfg.cluster.lease_ttl_s, "engine log access"), name="log-access"),
            asyncio.create_task(serve_until_cancelled(app, cfg.node.host, cfg.node.port, svc.notifier,
                                                      f"node agent {node.name}",
                                                      agent.status_line, healthy=mirrors.live,
                                                      listening_hook=settle_heap), name="http"),
        ]
        try:
            await run_tasks_until(svc.stop, tasks)
        finally:
            await units.close()  # engines keep running: a restarted agent re-adopts them
