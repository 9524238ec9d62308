"""Cluster records as the admin and status endpoints read them from etcd, and the model view they share.

A damaged record is logged and left out: one bad key must not take an endpoint down.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from nebula.core import keys
from nebula.core.model import InstanceStatus, ModelSpec, NodeRecord, Phase, loads
from nebula.core.status import ModelStatus
from nebula.core.store import KeyValue, Store
from nebula.errors import ValidationError

log = logging.getLogger(__name__)


def node_records(items: Iterable[KeyValue]) -> list[NodeRecord]:
    out = []
    for kv in items:
        try:
            out.append(NodeRecord.from_dict(loads(kv.value)))
        except (ValidationError, KeyError, TypeError, ValueError) as e:
            log.warning("invalid node record %s: %r", kv.key, e)
    return out


def model_spec(kv: KeyValue) -> ModelSpec | None:
    try:
        return ModelSpec.from_dict(loads(kv.value))
    except ValidationError as e:
        log.warning("invalid model record %s: %s", kv.key, e)
        return None


def instance_records(items: Iterable[KeyValue]) -> list[InstanceStatus]:
    out = []
    for kv in items:
        try:
            out.append(InstanceStatus.from_dict(loads(kv.value)))
        except ValidationError as e:
            log.warning("invalid instance record %s: %s", kv.key, e)
    return out


def model_json(name: str, spec: ModelSpec | None, instances: list[InstanceStatus],
                pending: Mapping[str, str] | None = None) -> dict[str, Any]:
    mine = sorted((i for i in instances if i.model == name), key=lambda i: i.instance)
    return {
        "name": name,
        # None: the model was unloaded and some of its instances are still draining.
        "spec": spec.to_dict() if spec else None,
        "ready": sum(1 for i in mine if i.phase is Phase.READY),
        # Why replicas fit nowhere (the scheduler's words), or None.
        "pending_reason": (pending or {}).get(name) if spec else None,
        "instances": [{"instance": i.instance, "phase": i.phase.value, "node": i.node, "endpoint": i.endpoint,
                       "message": i.message, "since": i.since, "restarts": i.restarts, "progress": i.progress}
                      for i in mine],
    }


async def pending_reasons(store: Store, name: str | None = None) -> dict[str, str]:
    """Pending reasons by model, as the scheduler leader wrote them (all, or the one of `name`)."""
    items = ((await store.list_prefix(keys.MODEL_STATUS)).items if name is None
             else [kv for kv in [await store.get(keys.model_status_key(name))] if kv is not None])
    out: dict[str, str] = {}
    for kv in items:
        try:
            status = ModelStatus.from_dict(loads(kv.value))
        except ValidationError as e:
            log.warning("invalid model status %s: %s", kv.key, e)
            continue
        out[status.model] = status.pending
    return out
