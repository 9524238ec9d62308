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
from typing import TypeVar

from aiohttp import web

from nebula.core import keys, records
from nebula.core.discovery import sd_targets
from nebula.services.gateway.records import decoded
from nebula.services.gateway.state import GATEWAY

log = logging.getLogger(__name__)
T = TypeVar("T")

SD_PATH = "/v1/admin/prometheus/sd"


async def prometheus_sd(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    services = decoded(records.SERVICES, (await st.store.list_prefix(keys.SERVICES)).items)
    instances = decoded(records.INSTANCES, (await st.store.list_prefix(keys.INSTANCES)).items)
    return web.json_response(sd_targets(services, instances))


def routes() -> list[web.RouteDef]:
    return [web.get(SD_PATH, prometheus_sd)]
