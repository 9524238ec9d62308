"""Wiring of `nebula router run`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from nebula.core.config import NebulaConfig
from nebula.services.router.app import serve_router
from nebula.services.runtime import run_tasks_until, service_context


async def run_router(cfg: NebulaConfig, env: Mapping[str, str]) -> None:
    async with service_context(cfg, env) as svc:
        task = asyncio.create_task(serve_router(cfg, svc.store, svc.registry, svc.notifier), name="router")
        await run_tasks_until(svc.stop, [task])
