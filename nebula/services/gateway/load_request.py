"""A load request, from the client's JSON to the spec the admin API stores.

In order: a catalog name becomes a hub source (core/catalog.py); the spec is parsed and its engine flags
checked; a request equal to what is loaded already is answered from the store (idempotent, however the fleet
changed since); the model's own files are read (services/gateway/model_profiles.py: local on this host, or
metadata from the hub, never the weights) into a profile; the profile is checked against the request; a
replica is sized (core/sizing.py) and a model no GPU can hold is refused with the numbers, unless the request
says `"allow_pending": true` (it then waits pending, e.g. for a node that has not joined yet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nebula.core import keys, records
from nebula.core.catalog import Catalog
from nebula.core.config import EngineConfig, ModelsConfig, NodeConfig
from nebula.core.engine_args import check_engine_request
from nebula.core.engine_runtime import check_runtime_available
from nebula.core.engine_support import check_quantization
from nebula.core.families import Families
from nebula.core.model import ModelSpec, NodeRecord, Task
from nebula.core.model_load import as_requested, with_derived
from nebula.core.profile import ModelProfile
from nebula.core.sizing import DEFAULT_RESERVE_MIB, Refusal, size
from nebula.core.store import Store
from nebula.errors import ValidationError
from nebula.services.gateway.catalog_api import resolve_catalog_model
from nebula.services.gateway.model_profiles import read_profile
from nebula.services.http.errors import ApiError

log = logging.getLogger(__name__)

ALLOW_PENDING = "allow_pending"


@dataclass(frozen=True)
class LoadPlan:
    spec: ModelSpec
    """What to store."""
    existing: ModelSpec | None = None
    """The stored spec, when the request asks for exactly it (nothing to write)."""
    note: str = ""
    """Why the spec has no profile or no memory estimate, for the answer; empty when it has both."""
    allow_pending: bool = False
    """The request may wait pending for GPUs no node has yet."""


async def plan_load(body: object, *, catalog: Catalog, store: Store, engine: EngineConfig, node: NodeConfig,
                    models: ModelsConfig, nodes: list[NodeRecord], families: Families | None = None,
                    gpu_headroom_mib: int = DEFAULT_RESERVE_MIB) -> LoadPlan:
    """The spec a load request stores. ValidationError (400) for a bad request; ApiError for a refusal."""
    resolved, variant = resolve_catalog_model(body, catalog)
    if not isinstance(resolved, dict):
        raise ValidationError("", "model spec must be a JSON object")
    request: dict[str, Any] = dict(resolved)
    allow_pending = request.pop(ALLOW_PENDING, False)
    if not isinstance(allow_pending, bool):
        raise ValidationError(ALLOW_PENDING, "must be a boolean")
    if "profile" in request:
        raise ValidationError("profile", "is read from the model's files by Nebula; leave it out of the request "
                              "(nebula show MODEL prints it)")
    spec = ModelSpec.from_dict(request)
    check_engine_request(spec.engine_args, spec.trust_remote_code, engine.allowed_engine_args,
                         engine.allow_trust_remote_code)  # 400 naming the flag and the config key
    check_runtime_available(spec.engine_runtime, nodes)  # 400 naming the install command
    existing = await _stored(store, spec.name)
    if existing is not None and as_requested(existing) == spec:
        return LoadPlan(existing, existing=existing)
    read = await read_profile(spec, node, models, families)
    profile = read.profile
    notes = [read.reason] if read.reason else []
    filled: dict[str, tuple[Any, str]] = {}
    if profile is not None:
        if variant is not None:
            profile = _with(profile, "source", variant.provenance)
        task = _task(profile, spec, explicit="task" in request)
        if task is not spec.task:
            filled["task"] = (task, f"detected: {profile.derived.get('task', profile.architecture)}")
        check_engine_request(profile.family_args(), False, engine.allowed_engine_args, False)
        check_quantization(profile)
    sizing = size(spec, profile, nodes, models, engine.default_max_model_len, force=allow_pending,
                  reserve_mib=gpu_headroom_mib)
    if isinstance(sizing, Refusal):
        raise ApiError(400, f"model '{spec.name}' {sizing.reason} (or send {ALLOW_PENDING}: true / "
                       "nebula load --allow-pending to let it wait for such a node)", param="gpus_per_replica",
                       code="insufficient_gpu_memory")
    if sizing.gpus_per_replica:
        filled |= {"gpus_per_replica": (sizing.gpus_per_replica, sizing.explanation),
                   "tensor_parallel_size": (sizing.tensor_parallel, sizing.explanation),
                   "gpu_memory_mib": (sizing.gpu_memory_mib, sizing.explanation)}
        if not sizing.gpu_memory_mib:
            notes.append(sizing.explanation)
    if sizing.max_model_len is not None:
        filled["max_model_len"] = (sizing.max_model_len, _len_reason(profile, engine))
    if profile is None:
        # Nothing was read: the spec stays as requested and the engine derives what it can on its node.
        return LoadPlan(spec, note="; ".join(notes), allow_pending=allow_pending)
    return LoadPlan(with_derived(spec, profile, filled), note="; ".join(notes), allow_pending=allow_pending)


async def _stored(store: Store, name: str) -> ModelSpec | None:
    kv = await store.get(keys.model_key(name))
    if kv is None:
        return None
    try:
        return records.MODELS.decode(kv.key, kv.value)
    except ValidationError:
        return None  # a damaged record: the write's own guard answers 409


def _task(profile: ModelProfile, spec: ModelSpec, *, explicit: bool) -> Task:
    try:
        detected = Task(profile.task) if profile.task else None
    except ValueError:
        detected = None
    if detected is None or detected is spec.task:
        return spec.task
    if explicit:
        raise ApiError(400, f"task '{spec.task.value}' contradicts the model's files: {profile.architecture} is "
                       f"a {detected.value} model ({profile.derived.get('task', 'from its architecture')}); "
                       f"load it with --task {detected.value}, or leave --task out", param="task",
                       code="task_mismatch")
    return detected


def _with(profile: ModelProfile, key: str, why: str) -> ModelProfile:
    return ModelProfile.from_dict(profile.to_dict() | {"derived": dict(profile.derived) | {key: why}})


def _len_reason(profile: ModelProfile | None, engine: EngineConfig) -> str:
    own = profile.derived.get("max_positions", "") if profile is not None else ""
    parts = [f"[engine] default_max_model_len={engine.default_max_model_len}"] if engine.default_max_model_len else []
    if own:
        parts.append(f"the model's own limit ({own})")
    return "min of " + " and ".join(parts) if parts else "the model's own limit"
