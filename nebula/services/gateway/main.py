"""Wiring of `nebula gateway run`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

from nebula.adapters.sdnotify import Notifier
from nebula.adapters.shared_limits import FD_ENV as LIMITS_FD_ENV
from nebula.adapters.shared_limits import SharedTable
from nebula.core.config import NebulaConfig
from nebula.core.discovery import ServiceKind, advertised_address
from nebula.services.gateway.app import serve_gateway, with_bootstrap_key
from nebula.services.gateway.console_session import SECRET_ENV, new_console_secret
from nebula.services.gateway.workers import supervise_workers, worker_command
from nebula.services.registration import keep_registered, service_record
from nebula.services.runtime import (
    node_name,
    run_tasks_until,
    serve_metrics,
    service_context,
    settle_heap,
    stop_on_signals,
)

log = logging.getLogger(__name__)


async def run_gateway(cfg: NebulaConfig, env: Mapping[str, str], worker: int | None = None) -> None:
    """One gateway: alone, or worker `worker` of gateway.workers (sharing the port, with /metrics of its own)."""
    async with service_context(cfg, env) as svc, contextlib.AsyncExitStack() as stack:
        record = service_record(cfg, ServiceKind.GATEWAY, node_name(cfg))
        if worker is not None:
            # Each worker's own series, where Prometheus can tell the workers apart.
            port = await stack.enter_async_context(serve_metrics(
                svc.registry, cfg.gateway.host,
                cfg.gateway.worker_metrics_port + worker if cfg.gateway.worker_metrics_port else 0))
            record = replace(record, address=advertised_address(cfg.gateway.host, port, cfg.node.address))
        await run_tasks_until(svc.stop, [
            asyncio.create_task(serve_gateway(cfg, svc.store, svc.registry, svc.notifier, worker,
                                              listening_hook=settle_heap), name="gateway"),
            asyncio.create_task(keep_registered(svc.store, record, cfg.cluster.lease_ttl_s), name="registration"),
        ])


async def run_supervisor(cfg: NebulaConfig, env: Mapping[str, str], config_file: str) -> int:
    """gateway.workers > 1: this process only keeps the workers (workers.py); they serve."""
    notifier = Notifier(env)
    # Per-key limits counted together: one table every worker maps; a dead worker's requests leave it.
    limits = SharedTable.create(cfg.gateway.workers)
    try:
        # One console secret for all workers, so a session one worker opened is good at the others.
        shared = {**env, SECRET_ENV: new_console_secret(), LIMITS_FD_ENV: str(limits.fd)}
        return await supervise_workers(cfg.gateway.workers, worker_command(config_file), shared, notifier,
                                       stop_on_signals(), pass_fds=(limits.fd,), on_exit=limits.clear_worker)
    finally:
        notifier.close()
        limits.close()


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


def run_gateway_process(cfg: NebulaConfig, env: Mapping[str, str], config_file: str,
                        worker: int | None = None) -> None:
    """`nebula gateway run`: the gateway until SIGTERM, on the configured event loop; with gateway.workers > 1,
    the supervisor of that many workers (each `nebula gateway run --worker I`)."""
    with_bootstrap_key(cfg.gateway)  # refuses, before anything starts, to serve beyond loopback with no admin key
    if worker is None and cfg.gateway.workers > 1:
        asyncio.run(run_supervisor(cfg, env, config_file))
        return
    with asyncio.Runner(loop_factory=gateway_loop_factory(cfg.gateway.event_loop)) as runner:
        runner.run(run_gateway(cfg, env, worker))
