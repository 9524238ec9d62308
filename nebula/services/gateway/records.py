"""Cluster records as the admin and status endpoints read them from etcd, and the model view they share.

Every record is decoded by its kind (core/records.py); a damaged one is left out: one bad key must not
take an endpoint down.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from nebula.core import keys, records
from nebula.core.elastic import ScaleState
from nebula.core.elastic_state import model_state
from nebula.core.model import InstanceStatus, ModelSpec, NodeRecord, Phase
from nebula.core.records import RecordKind
from nebula.core.store import KeyValue, Store
from nebula.errors import ValidationError

log = logging.getLogger(__name__)
T = TypeVar("T")


def decoded(kind: RecordKind[T], items: Iterable[KeyValue]) -> list[T]:
    """The valid records among `items` (a direct read of a prefix); the gateway's mirrors already name
    each refused one in its log, so they are skipped quietly here."""
    out = []
    for kv in items:
        try:
            out.append(kind.decode(kv.key, kv.value))
        except ValidationError as e:
            log.debug("skipping %s %r: %s", kind.what, kv.key, e)
    return out


def node_records(items: Iterable[KeyValue]) -> list[NodeRecord]:
    return decoded(records.NODES, items)


def model_spec(kv: KeyValue) -> ModelSpec | None:
    found = decoded(records.MODELS, [kv])
    return found[0] if found else None


def instance_records(items: Iterable[KeyValue], nodes: Iterable[KeyValue] = ()) -> list[InstanceStatus]:
    """The instances' records; with the node records given, a `ready` that no current agent vouches for reads
    as `starting`.

    An agent writes its node record and its instances' records under one lease. A record under another
    lease was left by an earlier run of that node's agent (`nebula down` then `up`: etcd renews every lease
    on its restart, so such records outlive the agent by a lease TTL) and says nothing about the engine now.
    """
    leases = {n.name: kv.lease for kv in nodes for n in decoded(records.NODES, [kv])}
    out = []
    for kv in items:
        for st in decoded(records.INSTANCES, [kv]):
            if st.phase is Phase.READY and st.node in leases and leases[st.node] != kv.lease:
                st = replace(st, phase=Phase.STARTING,
                             message=f"not yet confirmed by {st.node}'s agent (a record from before it restarted)")
            out.append(st)
    return out


def model_json(name: str, spec: ModelSpec | None, instances: list[InstanceStatus],
                pending: Mapping[str, str] | None = None, scale: Mapping[str, ScaleState] | None = None,
                wakes: Collection[str] = ()) -> dict[str, Any]:
    """`scale`: elastic models' scale states (/nebula/scale/); `wakes`: the models with a wake request
    (/nebula/wake/), for an elastic model's `state`."""
    mine = sorted((i for i in instances if i.model == name), key=lambda i: i.instance)
    out = {
        "name": name,
        # None: the model was unloaded and some of its instances are still draining.
        "spec": spec.to_dict() if spec else None,
        "ready": sum(1 for i in mine if i.phase is Phase.READY),
        # Why replicas fit nowhere (the scheduler's words), or None.
        "pending_reason": (pending or {}).get(name) if spec else None,
        "instances": [{"instance": i.instance, "phase": i.phase.value, "node": i.node, "endpoint": i.endpoint,
                       "message": i.message, "since": i.since, "restarts": i.restarts, "progress": i.progress,
                       "history": [[p.value, t] for p, t in i.history]}
                      for i in mine],
        # An elastic model's count now (the scheduler's words), or None for a fixed count.
        "scale": scale_json(spec, (scale or {}).get(name)),
    }
    if spec is not None and spec.scaling is not None:
        # An elastic model's: idle, waking, sleeping or ready (core/elastic_state.py).
        out["state"] = model_state(Counter(i.phase for i in mine), name in wakes).value
    return out


def scale_json(spec: ModelSpec | None, state: ScaleState | None) -> dict[str, Any] | None:
    """What the scheduler wants of an elastic model now: `idle` at 0 replicas (it wakes on its next request),
    `asleep` while its replicas sleep, else `active`; before the scheduler's first word, the spec's count."""
    if spec is None or spec.scaling is None:
        return None
    if state is None:
        state = ScaleState(model=spec.name, replicas=spec.replicas, reason="not yet seen by the scheduler")
    mode = "idle" if state.replicas == 0 else "asleep" if state.sleep_level else "active"
    return state.to_dict() | {"state": mode, "min_replicas": spec.scaling.min_replicas,
                              "max_replicas": spec.scaling.max_replicas}


async def scale_states(store: Store, name: str | None = None) -> dict[str, ScaleState]:
    """Elastic models' scale states, as the scheduler leader wrote them (all, or the one of `name`)."""
    items = ((await store.list_prefix(keys.SCALE)).items if name is None
             else [kv for kv in [await store.get(keys.scale_key(name))] if kv is not None])
    return {s.model: s for s in decoded(records.SCALE, items)}


async def pending_reasons(store: Store, name: str | None = None) -> dict[str, str]:
    """Pending reasons by model, as the scheduler leader wrote them (all, or the one of `name`)."""
    items = ((await store.list_prefix(keys.MODEL_STATUS)).items if name is None
             else [kv for kv in [await store.get(keys.model_status_key(name))] if kv is not None])
    return {status.model: status.pending for status in decoded(records.MODEL_STATUS, items)}


async def model_listing(store: Store, wakes: Collection[str] = ()) -> tuple[list[KeyValue], list[dict[str, Any]]]:
    """(the node records' items, every model as `model_json` shows it): the one read of etcd behind GET
    /v1/admin/models, /v1/admin/status and the console's fleet page, so the three never disagree."""
    node_items = (await store.list_prefix(keys.NODES)).items
    specs = {s.name: s for kv in (await store.list_prefix(keys.MODELS)).items if (s := model_spec(kv))}
    instances = instance_records((await store.list_prefix(keys.INSTANCES)).items, node_items)
    pending = await pending_reasons(store)
    scale = await scale_states(store)
    names = sorted(set(specs) | {i.model for i in instances})
    return list(node_items), [model_json(n, specs.get(n), instances, pending, scale, wakes) for n in names]
