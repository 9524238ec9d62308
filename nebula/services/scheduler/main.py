"""Wiring of `nebula scheduler run`: etcd mirrors, leader election, placement passes, /metrics, sd_notify."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula.adapters.sdnotify import Notifier
from nebula.adapters.watching import mirror_prefix
from nebula.core import keys
from nebula.core.config import NebulaConfig
from nebula.services.runtime import (
    metrics_route,
    node_name,
    notify_ready_and_watch,
    open_store,
    run_tasks_until,
    serve_app,
    stop_on_signals,
)
from nebula.services.scheduler.scheduler import Scheduler

log = logging.getLogger("nebula.scheduler")


async def run_scheduler(cfg: NebulaConfig, env: Mapping[str, str]) -> None:
    stop = stop_on_signals()
    registry = CollectorRegistry()
    notifier = Notifier(env)
    store = await open_store(cfg)
    identity = f"{node_name(cfg)}:{os.getpid()}"
    sched = Scheduler(store, identity, lease_ttl_s=cfg.cluster.lease_ttl_s, node_grace_s=cfg.scheduler.node_grace_s,
                      resync_s=cfg.scheduler.resync_s, registry=registry)
    app = web.Application()
    app.add_routes([metrics_route(registry)])
    runner = await serve_app(app, cfg.scheduler.host, cfg.scheduler.port)
    tasks = [
        asyncio.create_task(mirror_prefix(store, keys.MODELS, sched.on_models), name="models"),
        asyncio.create_task(mirror_prefix(store, keys.NODES, sched.on_nodes), name="nodes"),
        asyncio.create_task(mirror_prefix(store, keys.PLACEMENTS, sched.on_placements), name="placements"),
        asyncio.create_task(sched.run(), name="leadership"),
        asyncio.create_task(notify_ready_and_watch(
            notifier, lambda: True, lambda: "leader" if sched.is_leader else "standby"), name="watchdog"),
    ]
    log.info("scheduler %s up", identity)
    try:
        await run_tasks_until(stop, tasks)
    finally:
        notifier.notify(STOPPING=1)
        await runner.cleanup()
        await store.close()
