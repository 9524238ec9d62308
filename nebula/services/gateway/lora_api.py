"""The admin API for LoRA adapters (core/lora.py): add, list, remove; desired state in /nebula/adapters/.

An adapter is checked where it is added, so a mistake is a clear 4xx now rather than an engine refusing it
later on every replica: its base must be a loaded model whose engines run with --enable-lora, its rank (read
from its adapter_config.json when the gateway can read the directory, else as given) within the base's
--max-lora-rank, and its name no model's (they share the namespace requests are routed by). The write lands
only while the base is as checked. Agents then load it on every replica of the base; what each replica has
loaded, or the engine's message for a refusal, comes back through the instances' status records.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from nebula.adapters.lora_files import read_adapter_config
from nebula.core import keys, records
from nebula.core.lora import AdapterSpec, adapter_rank, check_adapter
from nebula.core.model import InstanceStatus, loads, validate_name
from nebula.core.store import Store
from nebula.services.cluster.writes import Conflict
from nebula.services.gateway.records import decoded, instance_records, model_spec
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.errors import ApiError

log = logging.getLogger(__name__)


def adapter_json(adapter: AdapterSpec, instances: list[InstanceStatus]) -> dict[str, Any]:
    """An adapter with where it is loaded (instances of its base listing it) and the engines' refusals."""
    mine = sorted((i for i in instances if i.model == adapter.base), key=lambda i: i.instance)
    errors = {i.instance: dict(i.adapter_errors)[adapter.name] for i in mine
              if adapter.name in dict(i.adapter_errors)}
    return adapter.to_dict() | {"loaded_on": [i.instance for i in mine if adapter.name in i.adapters],
                                "replicas": len(mine), "errors": errors}


async def add_adapter(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    wanted = AdapterSpec.from_dict(loads(await request.read()))
    if await st.store.get(keys.model_key(wanted.name)) is not None:
        raise ApiError(409, f"'{wanted.name}' is a loaded model's name: an adapter needs a name of its own",
                       param="name", code="name_taken")
    base_kv = await st.store.get(keys.model_key(wanted.base))
    base = model_spec(base_kv) if base_kv is not None else None
    if base_kv is None or base is None:
        raise ApiError(404, f"base model '{wanted.base}' is not loaded: load it (with --engine-arg=--enable-lora) "
                       "first", param="base", code="model_not_found")
    config = await asyncio.to_thread(read_adapter_config, wanted.source)
    adapter = check_adapter(wanted, base, adapter_rank(config))
    try:
        created = await st.writes.add_adapter(adapter, base_kv.mod_revision)
    except Conflict as e:
        raise ApiError(409, str(e), code="conflict") from None
    if not created:
        current = await _adapter(st.store, adapter.name)
        if current != adapter:
            raise ApiError(409, f"adapter '{adapter.name}' exists with another base or source: remove it first "
                           f"(nebula adapter rm {adapter.name})", param="name", code="adapter_exists")
    else:
        log.info("LoRA adapter %s added on %s from %s", adapter.name, adapter.base, adapter.source,
                 extra={"NEBULA_MODEL": adapter.base, "NEBULA_ADAPTER": adapter.name})
    return web.json_response({"created": created, "adapter": adapter.to_dict()}, status=201 if created else 200)


async def _adapter(store: Store, name: str) -> AdapterSpec | None:
    kv = await store.get(keys.adapter_key(name))
    found = decoded(records.ADAPTERS, [kv]) if kv is not None else []
    return found[0] if found else None


async def list_adapters(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    adapters = decoded(records.ADAPTERS, (await st.store.list_prefix(keys.ADAPTERS)).items)
    instances = instance_records((await st.store.list_prefix(keys.INSTANCES)).items,
                                 (await st.store.list_prefix(keys.NODES)).items)
    return web.json_response({"object": "list", "data": [adapter_json(a, instances)
                                                         for a in sorted(adapters, key=lambda a: a.name)]})


async def remove_adapter(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    name = validate_name(request.match_info["name"], "name")
    if not await st.writes.remove_adapter(name):
        raise ApiError(404, f"adapter '{name}' does not exist", param="name", code="adapter_not_found")
    log.info("LoRA adapter %s removed", name, extra={"NEBULA_ADAPTER": name})
    return web.json_response({"name": name, "deleted": True})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/admin/adapters", add_adapter),
        web.get("/v1/admin/adapters", list_adapters),
        web.delete("/v1/admin/adapters/{name}", remove_adapter),
    ]
