"""Priority between models when GPUs run out: which idle elastic model of lower priority gives way to a model
that fits nowhere. Pure; the scheduler tries each candidate the order here gives, keeps the first whose
eviction lets the pending model place more replicas, and drops the others (an eviction that frees nothing
the pending model can use is never made).
"""

from __future__ import annotations

from collections.abc import Mapping

from nebula.core.elastic import ScaleState, ScalingPolicy
from nebula.core.model import ModelSpec
from nebula.core.scaling import Action, Decision, Fleet


def priority(spec: ModelSpec) -> int:
    """A model without a scaling policy has the default priority, 0."""
    return spec.scaling.priority if spec.scaling is not None else 0


def candidates(pending: str, specs: Mapping[str, ModelSpec], states: Mapping[str, ScaleState], fleet: Fleet, *,
               now: float, quiet_s: float) -> list[Decision]:
    """Evictions that may make room for the pending model `pending`, most evictable first (lowest priority, then
    the longest quiet). A victim is elastic with min_replicas 0, of lower priority, holds replicas (awake, or
    asleep at level 1, which keeps its GPU memory), has nothing in flight, held or queued, and has had no
    inference request for `quiet_s`: never a busy one."""
    want = specs.get(pending)
    if want is None:
        return []
    rank = priority(want)
    found: list[tuple[int, float, str, Decision]] = []
    for name, spec in specs.items():
        policy = spec.scaling
        state = states.get(name)
        if name == pending or policy is None or state is None or policy.min_replicas != 0 or policy.priority >= rank:
            continue
        if state.replicas == 0 or state.sleep_level == 2:
            continue  # holds no GPU memory already
        load = fleet.load(name)
        last = max(load.last_request, state.since)
        if load.busy or now - last < quiet_s or not fleet.reporters:
            continue
        reason = (f"evicted for {pending} (priority {rank} over {policy.priority}): {pending} fits nowhere, and "
                  f"{name} has had no request for {int(now - last)}s; it wakes on its next request")
        found.append((policy.priority, last, name, Decision(name, Action.EVICT, ScaleState(
            model=name, replicas=0, sleep_level=0, reason=reason, since=now), reason, path="stop")))
    return [d for *_, d in sorted(found, key=lambda f: (f[0], f[1], f[2]))]


def evictable(spec: ModelSpec) -> bool:
    """Whether `spec` can ever give way (for status text): only a model allowed to go to 0."""
    return (spec.scaling or ScalingPolicy()).min_replicas == 0 and spec.scaling is not None
