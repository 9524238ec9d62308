"""The admin API: desired models in /nebula/models/ (load, unload, scale) and views of the cluster.

It reads and writes the store directly (not the mirror) so an operator sees their own write at once;
/v1/admin/replicas is the exception: it shows this gateway's routing table, mirror and in-flight counts.
Writes are conditional: load uses create-if-absent, scale a compare-and-swap on mod_revision, so two
admins racing never silently overwrite each other.
"""

from __future__ import annotations

import logging

from aiohttp import web

from nebula.core import keys
from nebula.core.model import ModelSpec, NodeRecord, loads, validate_name
from nebula.services.cluster.writes import Conflict, LoadOutcome, Refused
from nebula.services.gateway import drain_api, lora_api, pulls_api, update_api
from nebula.services.gateway.catalog_api import catalog_of
from nebula.services.gateway.load_request import plan_load
from nebula.services.gateway.records import (
    instance_records,
    model_json,
    model_listing,
    model_spec,
    node_records,
    pending_reasons,
    scale_states,
)
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.errors import ApiError

log = logging.getLogger(__name__)



async def _read_json(request: web.Request) -> object:
    return loads(await request.read())


def _name(request: web.Request) -> str:
    return validate_name(request.match_info["name"], "name")


async def load_model(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    nodes = node_records((await st.store.list_prefix(keys.NODES)).items)
    plan = await plan_load(await _read_json(request), catalog=catalog_of(request.app), store=st.store,
                           engine=st.engine, node=st.node, models=st.models, nodes=nodes,
                           families=st.families, gpu_headroom_mib=st.gpu_headroom_mib)
    spec = plan.spec
    if not plan.allow_pending:
        _check_fleet_has_gpus(nodes, spec)
    if plan.existing is not None:
        return web.json_response({"created": False, "model": spec.to_dict(), "note": plan.note})
    try:
        outcome = await st.writes.load_model(spec)
    except Conflict as e:
        raise ApiError(409, str(e), code="conflict") from None
    except Refused as e:  # the name is a LoRA adapter's
        raise ApiError(409, str(e), param="name", code="name_taken") from None
    if outcome is LoadOutcome.DIFFERENT:
        raise ApiError(409, f"model '{spec.name}' is already loaded with a different spec; change its "
                       "replicas with PATCH, or unload it first", param="name", code="model_exists")
    if outcome is LoadOutcome.CREATED:
        log.info("model %s loaded (%d replicas)%s", spec.name, spec.replicas,
                 f": {plan.note}" if plan.note else "", extra={"NEBULA_MODEL": spec.name})
    return web.json_response({"created": outcome is LoadOutcome.CREATED, "model": spec.to_dict(), "note": plan.note})


def _check_fleet_has_gpus(nodes: list[NodeRecord], spec: ModelSpec) -> None:
    """400 for more GPUs per replica than any registered node has: no placement could ever hold it. GPU
    memory short of the need is a pending reason instead (a bigger GPU may join, or one may be freed), and
    an empty fleet (nodes not joined yet) is given the benefit of the doubt."""
    if spec.gpus_per_replica <= 0:
        return
    if not nodes or any(len(n.gpus) >= spec.gpus_per_replica for n in nodes):
        return
    most = max(nodes, key=lambda n: (len(n.gpus), n.name))
    raise ApiError(400, f"no node has {spec.gpus_per_replica} GPUs: the most on one node is {len(most.gpus)} "
                   f"({most.name}); lower gpus_per_replica or join such a node first", param="gpus_per_replica",
                   code="insufficient_gpus")


async def list_models(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    _, models = await model_listing(st.store, st.view.wakes)
    return web.json_response({"object": "list", "data": models})


async def get_model(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    name = _name(request)
    kv = await st.store.get(keys.model_key(name))
    spec = model_spec(kv) if kv else None
    instances = [i for i in instance_records((await st.store.list_prefix(keys.INSTANCES)).items,
                                             (await st.store.list_prefix(keys.NODES)).items) if i.model == name]
    if spec is None and not instances:
        raise ApiError(404, f"model '{name}' is not loaded", param="name", code="model_not_found")
    return web.json_response(model_json(name, spec, instances, await pending_reasons(st.store, name),
                                        await scale_states(st.store, name), st.view.wakes))


async def unload_model(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    name = _name(request)
    try:
        unloaded = await st.writes.unload_model(name)
    except Refused as e:  # LoRA adapters are served on it
        raise ApiError(409, str(e), param="name", code="model_has_adapters") from None
    if not unloaded:
        raise ApiError(404, f"model '{name}' is not loaded", param="name", code="model_not_found")
    log.info("model %s unloaded", name)
    return web.json_response({"name": name, "deleted": True})


async def scale_model(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    name = _name(request)
    body = await _read_json(request)
    if isinstance(body, dict) and update_api.is_update(body):  # engine fields: a rolling replace (nebula update)
        return await update_api.update_model(request, name, body)
    if not isinstance(body, dict) or set(body) != {"replicas"}:
        raise ApiError(400, "body must be {\"replicas\": N}; other fields cannot be changed in place",
                       param="replicas", code="invalid_value")
    try:
        wanted = await st.writes.scale_model(name, body["replicas"])
    except Conflict as e:
        raise ApiError(409, str(e), code="conflict") from None
    except Refused as e:  # an elastic model: its count is the scheduler's
        raise ApiError(409, str(e), param="replicas", code="model_is_elastic") from None
    if wanted is None:
        raise ApiError(404, f"model '{name}' is not loaded", param="name", code="model_not_found")
    return web.json_response({"model": wanted.to_dict()})


async def list_nodes(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    nodes = node_records((await st.store.list_prefix(keys.NODES)).items)
    return web.json_response({"object": "list", "data": [n.to_dict() for n in nodes]})


async def list_replicas(request: web.Request) -> web.Response:
    """The routing table as this gateway sees it: phases, READY replicas, in-flight counts, polled load."""
    st = request.app[GATEWAY]
    return web.json_response(st.table.to_json(st.clock()))


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/admin/models", load_model),
        web.post("/v1/models/load", load_model),
        web.get("/v1/admin/models", list_models),
        web.get("/v1/admin/models/{name}", get_model),
        web.delete("/v1/admin/models/{name}", unload_model),
        web.patch("/v1/admin/models/{name}", scale_model),
        web.get("/v1/admin/nodes", list_nodes),
        web.get("/v1/admin/replicas", list_replicas),
        *pulls_api.routes(),
        *update_api.routes(),
        *drain_api.routes(),
        *lora_api.routes(),
    ]
