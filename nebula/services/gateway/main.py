"""Wiring of `nebula gateway run`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from nebula.core.config import NebulaConfig
from nebula.core.discovery import ServiceKind
from nebula.services.gateway.app import serve_gateway
from nebula.services.registration import keep_registered, service_record
from nebula.services.runtime import node_name, run_tasks_until, service_context

log = logging.getLogger(__name__)


async def run_gateway(cfg: NebulaConfig, env: Mapping[str, str]) -> None:
    async with service_context(cfg, env) as svc:
        task = asyncio.create_task(serve_gateway(cfg, svc.store, svc.registry, svc.notifier), name="gateway")
        registration = asyncio.create_task(keep_registered(
            svc.store, service_record(cfg, ServiceKind.GATEWAY, node_name(cfg)), cfg.cluster.lease_ttl_s),
            name="registration")
        await run_tasks_until(svc.stop, [task, registration])


def gateway_loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for and installed (None: asyncio's own); see GatewayConfig.event_loop."""
    if event_loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("gateway.event_loop is 'uvloop' but uvloop is not installed; using asyncio's loop")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_gateway_process(cfg: NebulaConfig, env: Mapping[str, str]) -> None:
    """`nebula gateway run`: the gateway until SIGTERM, on the configured event loop."""
    with asyncio.Runner(loop_factory=gateway_loop_factory(cfg.gateway.event_loop)) as runner:
        runner.run(run_gateway(cfg, env))
