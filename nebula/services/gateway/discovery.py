"""GET /v1/admin/prometheus/sd: Prometheus `http_sd_configs` targets for the whole cluster, from etcd.

Every registered service (gateways, schedulers, node agents: /nebula/services/) and every engine serving
/metrics (/nebula/instances/), labelled job, service, node, and for engines model and instance, so one
scrape config follows a changing fleet (etc/prometheus/prometheus.yml).

Admin scope (the /v1/admin/ prefix): the answer maps every engine's address, and engines take requests
with no key at all; a map of them is for operators, not for every inference client.
It reads the store, not the gateway's mirrors, so a service registered a moment ago is listed; when the
store is unreachable the answer is 503 and Prometheus keeps the targets of its last good refresh.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from nebula.core import keys
from nebula.core.discovery import ServiceRecord, sd_targets
from nebula.core.model import InstanceStatus, loads
from nebula.core.store import Snapshot
from nebula.errors import ValidationError
from nebula.services.gateway.state import GATEWAY

log = logging.getLogger(__name__)
T = TypeVar("T")

SD_PATH = "/v1/admin/prometheus/sd"


def _parse_all(snapshot: Snapshot, parse: Callable[[object], T]) -> list[T]:
    out: list[T] = []
    for kv in snapshot.items:
        try:
            out.append(parse(loads(kv.value)))
        except ValidationError as e:
            log.debug("service discovery skips invalid record %s: %s", kv.key, e)
    return out


async def prometheus_sd(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    services = _parse_all(await st.store.list_prefix(keys.SERVICES), ServiceRecord.from_dict)
    instances = _parse_all(await st.store.list_prefix(keys.INSTANCES), InstanceStatus.from_dict)
    return web.json_response(sd_targets(services, instances))


def routes() -> list[web.RouteDef]:
    return [web.get(SD_PATH, prometheus_sd)]
