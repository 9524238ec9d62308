"""Requests that name a LoRA adapter: which spec checks them, which replicas take them, how /v1/models lists them.

A request whose `model` is an adapter goes, body unchanged (vLLM takes the adapter's name as `model`), to the
READY replicas of its base that report it loaded (their instance status records). Known but loaded nowhere
yet: 503 model_not_ready with Retry-After, as for a model still starting; but when the base is elastic and at
zero, the request is held like one for the base (wake.py) until a woken replica has the adapter loaded.
Keys: an adapter is a model of its own name, so a key limited to models sees and uses an adapter only when it
lists the adapter's name; a key allowed the base does not get its adapters with it (an adapter may be a
customer's fine-tune).
"""

from __future__ import annotations

from typing import Any

from nebula.core.apikeys import KeyRecord
from nebula.core.lora import AdapterSpec
from nebula.core.model import ModelSpec
from nebula.core.routing import Replica
from nebula.services.gateway.auth import model_allowed
from nebula.services.gateway.forward import Target
from nebula.services.gateway.state import GatewayState
from nebula.services.http.errors import unavailable


def resolve_model(st: GatewayState, model: str) -> tuple[ModelSpec, Target] | None:
    """The spec a request for `model` is checked against and where it may go; None when `model` is neither a
    loaded model nor an adapter of one. ApiError 503 for an adapter no READY replica has loaded yet."""
    spec = st.view.models.get(model)
    if spec is not None:
        return spec, Target(model)
    adapter = st.view.adapters.get(model)
    base = st.view.models.get(adapter.base) if adapter is not None else None
    if adapter is None or base is None:
        return None
    def holds_it(r: Replica) -> bool:  # read when asked: a held request waits for the set to change
        return r.instance in st.table.with_adapter(model)

    awake = st.table.ready().get(base.name, ())
    if not any(holds_it(r) for r in awake) and not (base.scaling is not None and not awake):
        raise unavailable(f"adapter '{model}' is not loaded on a ready replica of '{base.name}' yet; retry shortly",
                          code="model_not_ready")
    # An elastic base at zero: the request is held while the base wakes and its agent loads the adapter (wake.py).
    return base, Target(base.name, eligible=holds_it)


def adapter_entry(st: GatewayState, adapter: AdapterSpec) -> dict[str, Any]:
    """One entry of GET /v1/models for an adapter: as vLLM lists one (`parent`: its base, `root`: its source)
    plus Nebula's `ready` (replicas that have it loaded)."""
    base = st.view.models.get(adapter.base)
    ready = {r.instance for r in st.table.ready().get(adapter.base, ())} & st.table.with_adapter(adapter.name)
    return {"id": adapter.name, "object": "model", "created": 0, "owned_by": "nebula", "root": adapter.source,
            "parent": adapter.base, "task": base.task.value if base else "generate", "ready": len(ready)}


def adapter_entries(st: GatewayState, key: KeyRecord | None) -> list[dict[str, Any]]:
    """The adapters `key` may use whose base is loaded, by name."""
    return [adapter_entry(st, a) for name, a in sorted(st.view.adapters.items())
            if a.base in st.view.models and model_allowed(key, name)]


def find_adapter(st: GatewayState, key: KeyRecord | None, name: str) -> dict[str, Any] | None:
    """GET /v1/models/{name} for an adapter `key` may use; None otherwise."""
    adapter = st.view.adapters.get(name)
    if adapter is None or adapter.base not in st.view.models or not model_allowed(key, name):
        return None
    return adapter_entry(st, adapter)
