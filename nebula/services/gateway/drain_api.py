"""`/v1/admin/nodes/{node}/drain`: move a node's replicas away before maintenance (`nebula node drain`), and
take it back (`nebula node undrain`). GET /v1/admin/drains lists drains with how far each has got.

The scheduler moves the replicas with the rolling replace's surge (core/rollout.py): a replacement elsewhere is
ready before the old one drains. A drain that would leave a model nowhere to run is refused with the reason
(core/drain.py), unless forced: the model's replicas on that node then stop, and it waits pending.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from nebula.core import keys, records
from nebula.core.drain import drain_blockers
from nebula.core.model import loads, validate_name
from nebula.core.rollout_records import DrainRecord
from nebula.errors import ValidationError
from nebula.services.cluster.rollout_writes import RolloutWrites
from nebula.services.gateway.auth import request_key
from nebula.services.gateway.records import decoded, node_records
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.errors import ApiError

log = logging.getLogger(__name__)


def _node(request: web.Request) -> str:
    return validate_name(request.match_info["node"], "node")


async def drain_node(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    node = _node(request)
    raw = await request.read()
    body = loads(raw) if raw.strip() else {}
    if not isinstance(body, dict) or set(body) - {"force"} or not isinstance(body.get("force", False), bool):
        raise ValidationError("force", "the body is {\"force\": true|false} or empty")
    force: bool = body.get("force", False)
    nodes = {n.name: n for n in node_records((await st.store.list_prefix(keys.NODES)).items)}
    if node not in nodes:
        raise ApiError(404, f"node '{node}' is not live (nebula nodes lists them)", param="node",
                       code="node_not_found")
    models = {m.name: m for m in decoded(records.MODELS, (await st.store.list_prefix(keys.MODELS)).items)}
    placements = decoded(records.PLACEMENTS, (await st.store.list_prefix(keys.PLACEMENTS)).items)
    drained = {d.node for d in decoded(records.DRAINS, (await st.store.list_prefix(keys.DRAINS)).items)}
    blockers = drain_blockers(node, models, nodes, placements, drained)
    if blockers and not force:
        raise ApiError(409, "; ".join(blockers) + ": join or undrain a node that can, or drain with --force to "
                       "stop those replicas", param="node", code="last_node")
    key = request_key(request)
    record = DrainRecord(node=node, since=time.time(), by=key.name if key is not None else "admin", force=force)
    created = await RolloutWrites(st.store).drain(record)
    if created:
        log.info("node %s draining%s", node, " (forced: " + "; ".join(blockers) + ")" if blockers else "",
                 extra={"NEBULA_NODE": node})
    return web.json_response({"node": node, "draining": True, "created": created, "force": force,
                              "stopping": blockers})


async def undrain_node(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    node = _node(request)
    if not await RolloutWrites(st.store).undrain(node):
        raise ApiError(404, f"node '{node}' is not drained", param="node", code="not_drained")
    log.info("node %s undrained", node, extra={"NEBULA_NODE": node})
    return web.json_response({"node": node, "draining": False})


async def list_drains(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    drains = decoded(records.DRAINS, (await st.store.list_prefix(keys.DRAINS)).items)
    placements = decoded(records.PLACEMENTS, (await st.store.list_prefix(keys.PLACEMENTS)).items)
    data = []
    for d in sorted(drains, key=lambda d: d.node):
        left = sorted(p.instance for p in placements if p.node == d.node)
        data.append(d.to_dict() | {"state": "draining" if left else "drained", "replicas_left": left})
    return web.json_response({"object": "list", "data": data})


def routes() -> list[web.RouteDef]:
    return [web.post("/v1/admin/nodes/{node}/drain", drain_node),
            web.delete("/v1/admin/nodes/{node}/drain", undrain_node),
            web.get("/v1/admin/drains", list_drains)]
