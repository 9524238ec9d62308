"""`GET /v1/admin/status`: the whole cluster in one answer, for `nebula status`.

Control-plane health (this gateway, etcd, the scheduler leader, each node's agent), the nodes and the models.
A node is alive while its record exists (the record lives under its agent's lease); a node whose record is
gone but which still holds placements is `lost` (the scheduler moves its replicas after node_grace_s).
An unreachable etcd is part of the answer (200 with `etcd.ok = false`), not an error: the status of a broken
cluster is exactly what the operator asks for.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from nebula import __version__
from nebula.core import keys
from nebula.core.model import NodeRecord
from nebula.errors import TemporaryError
from nebula.services.gateway import rollout_status
from nebula.services.gateway.records import (
    model_listing,
    node_records,
)
from nebula.services.gateway.state import GATEWAY, GatewayState

log = logging.getLogger(__name__)


def _gateway_json(st: GatewayState) -> dict[str, Any]:
    return {"ok": True, "version": __version__, "models_synced": st.view.models_synced,
            "replicas_synced": st.table.synced,
            "ready_replicas": sum(len(r) for r in st.table.ready().values())}


def _nodes_json(records: list[NodeRecord], placed: dict[str, int]) -> list[dict[str, Any]]:
    out = [r.to_dict() | {"alive": True, "placements": placed.get(r.name, 0)} for r in records]
    live = {r.name for r in records}
    out += [{"name": n, "alive": False, "placements": placed[n]} for n in sorted(placed) if n not in live]
    return sorted(out, key=lambda n: str(n["name"]))


async def cluster_status(st: GatewayState) -> dict[str, Any]:
    t0 = st.clock()
    try:
        leader = await st.store.get(keys.SCHEDULER_LEADER)
        latency_ms = (st.clock() - t0) * 1000
        placement_kvs = (await st.store.list_prefix(keys.PLACEMENTS)).items
        node_kvs, models = await model_listing(st.store, st.view.wakes)
    except TemporaryError as e:
        log.warning("status: etcd unreachable: %r", e)
        return {"gateway": _gateway_json(st),
                "etcd": {"ok": False, "error": str(e) or type(e).__name__},
                "scheduler": {"ok": None, "leader": None}, "nodes": None, "models": None}
    records = node_records(node_kvs)
    placed: dict[str, int] = {}
    for kv in placement_kvs:
        if (split := keys.split_placement_key(kv.key)) is not None:
            placed[split[0]] = placed.get(split[0], 0) + 1
    leader_id = leader.value.decode(errors="replace") if leader else None
    out = {"gateway": _gateway_json(st),
           "etcd": {"ok": True, "latency_ms": round(latency_ms, 1)},
           "scheduler": {"ok": leader_id is not None, "leader": leader_id},
           "nodes": _nodes_json(records, placed),
           "models": models}
    try:
        await rollout_status.annotate(st.store, out)  # drains and rolling replaces
    except TemporaryError as e:
        log.warning("status: drains and rollouts unreadable: %r", e)
    return out


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(await cluster_status(request.app[GATEWAY]))


def routes() -> list[web.RouteDef]:
    return [web.get("/v1/admin/status", get_status)]
