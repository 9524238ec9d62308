"""`PATCH /v1/admin/models/{name}` with engine fields: a rolling replace (`nebula update`), and its progress.

The new spec is the stored one, as requested, with the body's fields changed, validated exactly like a load
(services/gateway/load_request.py: engine flags, runtime, the model's files, sizing). It is written with the
rollout record in one transaction (services/cluster/rollout_writes.py); the scheduler leader then replaces the
replicas one at a time with surge, and rolls back on a failure (core/rollout.py).
`GET /v1/admin/models/{name}/rollout`: the rollout in progress (if any) and the last status.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from nebula.core import keys
from nebula.core.model import ModelSpec, validate_name
from nebula.core.model_load import as_requested
from nebula.core.rollout import engine_fingerprint
from nebula.core.rollout_records import RolloutRecord
from nebula.errors import ValidationError
from nebula.services.cluster.rollout_writes import RolloutWrites, UpdateInProgress
from nebula.services.cluster.writes import Conflict
from nebula.services.gateway.auth import request_key
from nebula.services.gateway.catalog_api import catalog_of
from nebula.services.gateway.load_request import plan_load
from nebula.services.gateway.records import node_records
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.errors import ApiError

log = logging.getLogger(__name__)

UPDATABLE = ("revision", "engine_args", "engine_runtime", "max_model_len", "trust_remote_code")


def is_update(body: object) -> bool:
    """A PATCH body that changes more than the replica count (the admin API's scale handler hands it here)."""
    return isinstance(body, dict) and bool(set(body) - {"replicas"})


def _not_loaded(name: str) -> ApiError:
    return ApiError(404, f"model '{name}' is not loaded", param="name", code="model_not_found")


async def update_model(request: web.Request, name: str, body: dict[str, Any]) -> web.Response:
    st = request.app[GATEWAY]
    unknown = sorted(set(body) - set(UPDATABLE))
    if unknown:
        also = " (change replicas on its own: PATCH {\"replicas\": N})" if "replicas" in unknown else ""
        raise ApiError(400, f"{', '.join(unknown)} cannot be changed in place{also}; an update may change "
                       f"{', '.join(UPDATABLE)}", param=unknown[0], code="invalid_value")
    writes = RolloutWrites(st.store)
    try:
        read = await writes.read_model(name)
    except ValidationError as e:
        raise ApiError(409, f"model '{name}' has a damaged record ({e}): unload and load it again",
                       param="name", code="model_damaged") from None
    if read is None:
        raise _not_loaded(name)
    current, revision = read
    running = await writes.read_rollout(name)
    if running is not None:
        raise _in_progress(UpdateInProgress(running))
    asked = as_requested(current).to_dict() | body
    nodes = node_records((await st.store.list_prefix(keys.NODES)).items)
    plan = await plan_load(asked, catalog=catalog_of(request.app), store=st.store, engine=st.engine, node=st.node,
                           models=st.models, nodes=nodes, families=st.families, gpu_headroom_mib=st.gpu_headroom_mib)
    new = plan.spec
    if plan.existing is not None or new == current:
        return web.json_response({"updated": False, "model": current.to_dict(), "note": "no change"})
    key = request_key(request)
    record = RolloutRecord(model=name, previous=current, target=new, started=time.time(),
                           by=key.name if key is not None else "admin")
    try:
        await writes.start_update(record, revision)
    except UpdateInProgress as e:
        raise _in_progress(e) from None
    except Conflict as e:
        raise ApiError(409, str(e), code="conflict") from None
    log.info("model %s updating (%s)%s", name, _changes(current, new), f": {plan.note}" if plan.note else "",
             extra={"NEBULA_MODEL": name})
    return web.json_response({"updated": True, "model": new.to_dict(), "target": engine_fingerprint(new),
                              "changes": _changes(current, new), "note": plan.note})


def _in_progress(e: UpdateInProgress) -> ApiError:
    return ApiError(409, str(e), param="name", code="update_in_progress")


def _changes(old: ModelSpec, new: ModelSpec) -> str:
    a, b = old.to_dict(), new.to_dict()
    diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and k != "profile"]
    return "; ".join(diff) or "profile"


async def get_rollout(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    name = validate_name(request.match_info["name"], "name")
    writes = RolloutWrites(st.store)
    record, status = await writes.read_rollout(name), await writes.read_status(name)
    if record is None and status is None and await st.store.get(keys.model_key(name)) is None:
        raise _not_loaded(name)
    return web.json_response({
        "model": name, "in_progress": record is not None,
        "target": engine_fingerprint(record.target) if record is not None else None,
        "started": record.started if record is not None else None, "by": record.by if record is not None else None,
        "status": status.to_dict() if status is not None else None,
        "text": status.text() if status is not None else ("starting" if record is not None else "no rollout"),
    })


def routes() -> list[web.RouteDef]:
    return [web.get("/v1/admin/models/{name}/rollout", get_rollout)]
