"""What a load request becomes once Nebula knows the model: the spec with its derived fields filled in.

The admin API reads the model's profile and sizes a replica (core/sizing.py); the fields it fills in that the
request left open (GPUs per replica, GPU memory, tensor-parallel size, max_model_len) are recorded in the
profile's `derived` map under `spec.<field>`, with what they came from. That record is what keeps loads
idempotent: the same request sent again compares equal to the stored spec *as requested*, even though the
fleet (and so a fresh sizing) may have changed since.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from nebula.core.model import ModelSpec, Task
from nebula.core.profile import ModelProfile

DERIVED_PREFIX = "spec."
# Fields sizing may fill, with the value a request that left them open carries.
SIZED_FIELDS: Mapping[str, Any] = {"task": Task.GENERATE, "gpus_per_replica": 0, "gpu_memory_mib": 0,
                                   "tensor_parallel_size": None, "max_model_len": None}


def with_derived(spec: ModelSpec, profile: ModelProfile, filled: Mapping[str, tuple[Any, str]]) -> ModelSpec:
    """`spec` with `profile` attached and each field in `filled` (field -> (value, why)) set; only fields the
    request left open may be filled (a declared value always wins)."""
    changes: dict[str, Any] = {}
    why: dict[str, str] = {}
    for name, (value, reason) in filled.items():
        if name not in SIZED_FIELDS:
            raise ValueError(f"{name} is not a field sizing fills")
        if getattr(spec, name) != SIZED_FIELDS[name]:
            continue  # declared by the request
        if value == SIZED_FIELDS[name]:
            continue
        changes[name] = value
        why[DERIVED_PREFIX + name] = reason
    derived = {k: v for k, v in profile.derived.items() if not k.startswith(DERIVED_PREFIX)} | why
    return replace(spec, profile=replace(profile, derived=derived), **changes)


def as_requested(spec: ModelSpec) -> ModelSpec:
    """The spec a request asked for: derived fields back to open, no profile."""
    if spec.profile is None:
        return spec
    changes = {name: SIZED_FIELDS[name] for name in SIZED_FIELDS
               if DERIVED_PREFIX + name in spec.profile.derived}
    return replace(spec, profile=None, **changes)


def derived_fields(spec: ModelSpec) -> dict[str, str]:
    """Each spec field Nebula filled in, with what it came from (for `nebula show` and the admin API)."""
    if spec.profile is None:
        return {}
    return {k.removeprefix(DERIVED_PREFIX): v for k, v in spec.profile.derived.items()
            if k.startswith(DERIVED_PREFIX)}
