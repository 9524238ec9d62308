"""Wiring of `nebula scheduler run`: etcd mirrors, leader election, placement passes, /metrics, sd_notify."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from aiohttp import web

from nebula.core.config import NebulaConfig
from nebula.core.discovery import ServiceKind
from nebula.core.rollout import RolloutTiming
from nebula.services.cluster.mirror import MirrorMetrics, MirrorSet
from nebula.services.registration import keep_registered, service_record
from nebula.services.runtime import (
    metrics_route,
    node_name,
    run_tasks_until,
    serve_until_cancelled,
    service_context,
    settle_heap,
)
from nebula.services.scheduler.rollout import Rollouts
from nebula.services.scheduler.scaling import defaults_from
from nebula.services.scheduler.scheduler import Scheduler


async def run_scheduler(cfg: NebulaConfig, env: Mapping[str, str]) -> None:
    async with service_context(cfg, env) as svc:
        identity = f"{node_name(cfg)}:{os.getpid()}"
        sched = Scheduler(svc.store, identity, lease_ttl_s=cfg.cluster.lease_ttl_s,
                          node_grace_s=cfg.scheduler.node_grace_s, resync_s=cfg.scheduler.resync_s,
                          registry=svc.registry, gpu_headroom_mib=cfg.scheduler.gpu_headroom_mib,
                          scaling=defaults_from(cfg.scheduler), scaling_pass_s=cfg.scheduler.scaling_pass_s,
                          evict_quiet_s=cfg.scheduler.evict_quiet_s,
                          rollouts=Rollouts(svc.store, RolloutTiming(
                              settle_s=cfg.scheduler.rollout_settle_s,
                              ready_timeout_s=cfg.scheduler.rollout_ready_timeout_s,
                              retry_after_s=cfg.scheduler.rollout_retry_s)))
        app = web.Application()
        app.add_routes([metrics_route(svc.registry)])
        metrics = MirrorMetrics(svc.registry)
        mirrors = MirrorSet(sched.mirrors(svc.store, metrics))
        tasks = [
            *mirrors.tasks(),
            asyncio.create_task(sched.run(), name="leadership"),
            asyncio.create_task(keep_registered(svc.store, service_record(cfg, ServiceKind.SCHEDULER, node_name(cfg)),
                                                cfg.cluster.lease_ttl_s), name="registration"),
            asyncio.create_task(serve_until_cancelled(
                app, cfg.scheduler.host, cfg.scheduler.port, svc.notifier, f"scheduler {identity}",
                lambda: "leader" if sched.is_leader else "standby", healthy=mirrors.live,
                listening_hook=settle_heap), name="http"),
        ]
        await run_tasks_until(svc.stop, tasks)
