"""`/v1/admin/pulls`: pre-fetch model weights onto nodes (`nebula pull`), and watch them arrive.

POST writes one pull intent per node (`/nebula/pulls/<node>/<id>`); each node's agent downloads into its
cache and reports under `/nebula/pull-status/<node>/<id>`; the node record then lists the source as cached,
and the scheduler prefers that node for the model. DELETE drops the intents (the weights stay cached).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from nebula.core import keys, records
from nebula.core.model import expect_field, loads, validate_name
from nebula.core.pulls import PullIntent
from nebula.errors import ValidationError
from nebula.services.gateway.records import decoded, model_spec, node_records
from nebula.services.gateway.state import GATEWAY, GatewayState
from nebula.services.http.errors import ApiError

log = logging.getLogger(__name__)


async def _live_nodes(st: GatewayState) -> list[str]:
    return sorted(n.name for n in node_records((await st.store.list_prefix(keys.NODES)).items))


async def _what(st: GatewayState, body: dict[str, Any]) -> tuple[str, str | None]:
    """(source, revision) of the body: a source, or a loaded model's."""
    if "model" in body:
        name = validate_name(expect_field(body, "model", str), "model")
        kv = await st.store.get(keys.model_key(name))
        spec = model_spec(kv) if kv is not None else None
        if spec is None:
            raise ApiError(404, f"model '{name}' is not loaded; pull a source instead (org/name, hf://..., "
                           "modelscope://...)", param="model", code="model_not_found")
        return spec.source, spec.revision
    return expect_field(body, "source", str), expect_field(body, "revision", str, None)


async def create_pull(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    body = loads(await request.read())
    if not isinstance(body, dict) or not ({"source", "model"} & set(body)):
        raise ApiError(400, 'body must be {"source": "org/name"} or {"model": NAME}, with optional "revision" '
                       'and "nodes"', param="source", code="invalid_value")
    source, revision = await _what(st, body)
    live = await _live_nodes(st)
    nodes = expect_field(body, "nodes", list, [])
    if not all(isinstance(n, str) for n in nodes):
        raise ValidationError("nodes", "must be a list of node names")
    unknown = sorted(set(nodes) - set(live))
    if unknown:
        raise ApiError(404, f"no live node named {', '.join(unknown)} (live: {', '.join(live) or 'none'})",
                       param="nodes", code="node_not_found")
    targets = sorted(set(nodes)) or live
    if not targets:
        raise ApiError(409, "no live nodes to pull onto; start a node agent first", code="no_nodes")
    now = time.time()
    intents = [PullIntent.new(n, source, revision, now) for n in targets]
    for p in intents:
        await st.writes.add_pull(p)
    log.info("pull %s of %s onto %s", intents[0].id, intents[0].source_id, ", ".join(targets))
    return web.json_response({"id": intents[0].id, "source": intents[0].source_id, "nodes": targets}, status=201)


async def _pulls(st: GatewayState) -> dict[str, dict[str, Any]]:
    """Pulls by id: the source and, per node, the agent's report (`waiting` until it sends one)."""
    statuses = {(s.node, s.id): s for s in decoded(records.PULL_STATUS,
                                                   (await st.store.list_prefix(keys.PULL_STATUS)).items)}
    out: dict[str, dict[str, Any]] = {}
    for p in decoded(records.PULLS, (await st.store.list_prefix(keys.PULLS)).items):
        entry = out.setdefault(p.id, {"id": p.id, "source": p.source_id, "nodes": {}})
        report = statuses.get((p.node, p.id))
        entry["nodes"][p.node] = (
            {"phase": report.phase.value, "message": report.message, "progress": report.progress} if report
            else {"phase": "waiting", "message": "the node has not reported yet", "progress": None})
    return out


async def list_pulls(request: web.Request) -> web.Response:
    pulls = await _pulls(request.app[GATEWAY])
    return web.json_response({"object": "list", "data": [pulls[k] for k in sorted(pulls)]})


async def get_pull(request: web.Request) -> web.Response:
    pull = (await _pulls(request.app[GATEWAY])).get(request.match_info["id"])
    if pull is None:
        raise ApiError(404, f"no pull {request.match_info['id']!r}", param="id", code="pull_not_found")
    return web.json_response(pull)


async def delete_pull(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    pid = request.match_info["id"]
    deleted = 0
    for p in decoded(records.PULLS, (await st.store.list_prefix(keys.PULLS)).items):
        if p.id == pid and await st.writes.remove_pull(p.node, p.id):
            deleted += 1
    if not deleted:
        raise ApiError(404, f"no pull {pid!r}", param="id", code="pull_not_found")
    return web.json_response({"id": pid, "deleted": True})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/admin/pulls", create_pull),
        web.get("/v1/admin/pulls", list_pulls),
        web.get("/v1/admin/pulls/{id}", get_pull),
        web.delete("/v1/admin/pulls/{id}", delete_pull),
    ]
