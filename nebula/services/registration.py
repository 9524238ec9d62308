"""A service's entry in /nebula/services/: where its /metrics answers, for the gateway's Prometheus discovery.

The record lives under a lease of its own, so it leaves with the process (at once on a clean stop, within
the lease's TTL after a crash), and it is written again whenever the lease had to be replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import NoReturn

from nebula.adapters.watching import LeaseKeeper, Sleep
from nebula.core import keys
from nebula.core.config import NebulaConfig
from nebula.core.discovery import ServiceKind, ServiceRecord, advertised_address
from nebula.core.model import dumps
from nebula.core.store import Store
from nebula.errors import TemporaryError

log = logging.getLogger(__name__)


def service_record(cfg: NebulaConfig, kind: ServiceKind, node: str) -> ServiceRecord:
    """The record of this process's service, from the address and port it listens on."""
    bind = {ServiceKind.GATEWAY: (cfg.gateway.host, cfg.gateway.port),
            ServiceKind.SCHEDULER: (cfg.scheduler.host, cfg.scheduler.port),
            ServiceKind.NODE: (cfg.node.host, cfg.node.port)}[kind]
    tls = kind is ServiceKind.GATEWAY and bool(cfg.gateway.tls_cert_file)
    return ServiceRecord(service=kind, node=node, address=advertised_address(*bind, cfg.node.address),
                         scheme="https" if tls else "http")


async def keep_registered(store: Store, record: ServiceRecord, ttl_s: int, *,
                          sleep: Sleep = asyncio.sleep) -> NoReturn:
    """Hold `record` in the store until cancelled, then remove it (best effort: a crash leaves it to the TTL)."""
    await keep_record(store, keys.service_key(record.service.value, record.node, record.address),
                      dumps(record.to_dict()), ttl_s, f"{record.service.value} metrics at {record.address}",
                      sleep=sleep)


async def keep_record(store: Store, key: str, value: bytes, ttl_s: int, what: str, *,
                      sleep: Sleep = asyncio.sleep) -> NoReturn:
    """Hold `value` at `key` under a lease of its own until cancelled, then remove it; `what` names it in the
    log (never the value: a record may hold a secret)."""

    async def write(lease: int) -> None:
        await store.put(key, value, lease=lease)
        log.info("registered %s", what)

    keeper = LeaseKeeper(store, ttl_s, write, sleep=sleep)
    try:
        await keeper.run()
    finally:
        with contextlib.suppress(TemporaryError):
            await keeper.revoke()
