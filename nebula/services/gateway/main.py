"""Wiring of `nebula gateway run`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from nebula.core.config import NebulaConfig
from nebula.services.gateway.app import serve_gateway
from nebula.services.runtime import run_tasks_until, service_context


async def run_gateway(cfg: NebulaConfig, env: Mapping[str, str]) -> None:
    async with service_context(cfg, env) as svc:
        task = asyncio.create_task(serve_gateway(cfg, svc.store, svc.registry, svc.notifier), name="gateway")
        await run_tasks_until(svc.stop, [task])
