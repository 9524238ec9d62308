"""The rolling replace: a pure `plan_rollout(view) -> RolloutPlan`; the scheduler's applier does the writes.

A model's placements whose engine would differ from the model's spec (a new revision, other engine flags, another
runtime), and those on a drained node, are *stale*. They are replaced one at a time, with surge:
1. place ONE extra replica with the model's spec (a free instance name: names may become sparse);
2. once it is READY and has stayed READY for `settle_s` (the gateways have seen it), retire one stale
   placement (its agent drains it: the gateways stop routing to it, in-flight requests finish);
3. repeat until nothing is stale; then the rollout is done.
If the new replica FAILS, or is not READY within `ready_timeout_s` of being placed, it is removed and the
model's spec rolls back to the rollout record's previous one (the still-old replicas then need no change, the
ones already replaced roll back the same way). With nothing to roll back to (a drain, or the rollback's own
roll), the rollout FAILS and holds for `retry_after_s` before trying again, so a broken spec never becomes a
restart loop.

`place()` (core/placement.py) keeps stale placements as they are (it no longer rewrites a kept placement's
spec when that would restart its engine) and adds the `extra` replicas this plan asks for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nebula.core.model import InstanceStatus, ModelSpec, Phase, Placement, instance_name, parse_instance_name
from nebula.core.rollout_records import RolloutRecord, RolloutState, RolloutStatus

# Fields that never reach the engine: a change to them alone rewrites placements in place, restarting nothing.
_NOT_ENGINE = ("replicas", "scaling", "labels")
MAX_REPLICA_INDEX = 999  # core/model.validate_instance_name


def one_replica(model: ModelSpec) -> ModelSpec:
    """What a placement carries: one replica's spec. Scaling a model (by hand, or its scaling policy) must not
    rewrite its other placements, so neither the count nor the policy travels in it."""
    return replace(model, replicas=1, scaling=None)


def _engine_dict(spec: ModelSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.to_dict().items() if k not in _NOT_ENGINE}


def same_engine(a: ModelSpec, b: ModelSpec) -> bool:
    """True when an engine started from `a` is the engine `b` asks for (they differ at most in count, scaling
    policy or node labels)."""
    return _engine_dict(a) == _engine_dict(b)


def engine_fingerprint(spec: ModelSpec) -> str:
    """A short stable name for the engine a spec asks for (a rollout's target)."""
    raw = json.dumps(_engine_dict(spec), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def free_instances(model: str, taken: Collection[str], count: int) -> list[str]:
    """The `count` lowest-numbered instance names of `model` not in `taken` (fewer when the names run out)."""
    out: list[str] = []
    for r in range(MAX_REPLICA_INDEX + 1):
        if len(out) >= count:
            break
        name = instance_name(model, r)
        if name not in taken:
            out.append(name)
    return out


def replica_order(inst: str) -> int:
    return parse_instance_name(inst)[1]


@dataclass(frozen=True)
class RolloutTiming:
    settle_s: float = 5.0
    """A new replica must have been READY this long (every gateway routes to it) before an old one retires."""
    ready_timeout_s: float = 900.0
    """A new replica not READY this long after it was placed counts as failed."""
    retry_after_s: float = 600.0
    """After a FAILED rollout (nothing to roll back to), wait this long before placing a new replica again."""


@dataclass(frozen=True)
class RolledBack:
    """A rollback the scheduler wrote, kept until its mirrors show it. The rollback is one transaction (the
    model's previous spec, the record deleted, the status), but the models, rollouts and statuses mirrors each
    follow their own prefix: a pass that sees the status but still the failed spec would start the failed
    update again, without a record, and end it as "done" under the old spec."""

    left: str
    """The engine fingerprint of the spec rolled back from."""
    started: float
    """The deleted rollout record's start."""

    def mirrored(self, model: ModelSpec, record: RolloutRecord | None) -> bool:
        """True once the model and its rollout record, as mirrored, are the ones the rollback wrote (or later)."""
        if record is not None:
            return record.started != self.started  # a later update's record: written after the rollback
        return engine_fingerprint(model) != self.left


@dataclass(frozen=True)
class RolloutView:
    """What the scheduler knows about one model, for one pass."""

    model: ModelSpec
    """The desired spec, with the replica count the scheduler wants now."""
    placements: Mapping[str, Placement]
    """This model's placements, by instance."""
    instances: Mapping[str, InstanceStatus]
    """Observed instances (any model's), by instance name."""
    now: float
    """Wall clock (instance phases' `since` are wall-clock times)."""
    record: RolloutRecord | None = None
    status: RolloutStatus | None = None
    drained: frozenset[str] = frozenset()
    rolled_back: RolledBack | None = None
    """This scheduler's last rollback of the model, while its mirrors may not show it yet."""


@dataclass(frozen=True)
class RolloutPlan:
    extra: int = 0
    """Replicas place() keeps or adds beyond the model's count (the surge): 0 or 1."""
    retire: tuple[str, ...] = ()
    """Placements to delete before place() runs (their agents drain them)."""
    status: RolloutStatus | None = None
    """The status to write; None: leave it as it is."""
    rollback: ModelSpec | None = None
    """Write this spec back as the model's (the record's previous one, with today's count and policy)."""
    finish: bool = False
    """Delete the rollout record."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """What was decided and why, for the log."""


def is_stale(p: Placement, model: ModelSpec, drained: Collection[str]) -> bool:
    return p.node in drained or not same_engine(p.model, model)


def plan_rollout(view: RolloutView, timing: RolloutTiming = RolloutTiming()) -> RolloutPlan:
    model, now, prev = view.model, view.now, view.status
    target = engine_fingerprint(model)
    if view.record is not None and not same_engine(view.record.target, model):
        # The record names another spec than the models mirror shows: one of the two mirrors lags (they are
        # written in one transaction). Decide nothing until they agree.
        return RolloutPlan(notes=("rollout record and model spec disagree; waiting for the mirrors",))
    if view.rolled_back is not None and not view.rolled_back.mirrored(model, view.record):
        return RolloutPlan(notes=("rolled back; waiting for the mirrors to show the previous spec",))
    ordered = sorted(view.placements.values(), key=lambda p: replica_order(p.instance))
    stale = [p for p in ordered if is_stale(p, model, view.drained)]
    fresh = [p for p in ordered if not is_stale(p, model, view.drained)]
    ready = [p for p in fresh if _settled(view.instances.get(p.instance), now, timing.settle_s)]
    ongoing = prev is not None and prev.target == target and prev.state is RolloutState.ROLLING
    since = prev.since if ongoing and prev is not None else (view.record.started if view.record else now)
    # Replicas already replaced when a rollback began (they run the spec that failed) roll back the same way;
    # the status keeps saying why. A later update or drain is a rollout of its own.
    back = prev is not None and prev.state is RolloutState.ROLLED_BACK and view.record is None and any(
        engine_fingerprint(p.model) == prev.target for p in stale)
    why = prev.reason if prev is not None and (back or (ongoing and prev.reason)) else ""

    def status(state: RolloutState, **kw: Any) -> RolloutStatus:
        base = RolloutStatus(model=model.name, state=state, target=target, replaced=len(ready),
                             total=model.replicas, reason=why, since=since, updated=now)
        return replace(base, **kw)

    if not stale:
        if view.record is not None or ongoing:
            end = RolloutState.ROLLED_BACK if why else RolloutState.DONE
            return RolloutPlan(finish=view.record is not None, status=status(end),
                               notes=(f"all {len(fresh)} replicas run the spec, on undrained nodes",))
        return RolloutPlan()
    if (prev is not None and prev.state is RolloutState.FAILED and prev.target == target
            and now - prev.updated < timing.retry_after_s):
        return RolloutPlan()  # holding after a failure with nothing to roll back to
    waiting = [p for p in fresh if p not in ready]
    if waiting and len(ordered) > model.replicas:
        return _judge(view, timing, stale, waiting, status, prev if ongoing else None)
    if waiting:
        # A replica place() added for a lost one, not a surge: not ours to judge; wait for it.
        return RolloutPlan(status=status(RolloutState.ROLLING, surge=waiting[0].instance,
                                         surge_since=prev.surge_since if ongoing and prev is not None else now))
    if len(ordered) > model.replicas:
        old = stale[0]
        return RolloutPlan(retire=(old.instance,), status=status(RolloutState.ROLLING),
                           notes=(f"replacing {old.instance} on {old.node}: its successor is ready",))
    taken = set(view.placements) | {i for i, s in view.instances.items() if s.model == model.name}
    names = free_instances(model.name, taken, 1)
    if not names:
        return RolloutPlan(status=status(RolloutState.FAILED, reason="no free instance name for a new replica"))
    return RolloutPlan(extra=1, status=status(RolloutState.ROLLING, surge=names[0], surge_since=now),
                       notes=(f"placing {names[0]} (the model's spec, an undrained node) before retiring "
                                                f"{stale[0].instance}",))


def _judge(view: RolloutView, timing: RolloutTiming, stale: list[Placement], waiting: list[Placement],
           status: Any, ongoing: RolloutStatus | None) -> RolloutPlan:
    """A new replica is not (settled) READY yet: keep waiting, or give up on it and roll back."""
    model, now = view.model, view.now
    surge = next((p for p in waiting if ongoing is not None and p.instance == ongoing.surge), waiting[0])
    placed_at = ongoing.surge_since if ongoing is not None and ongoing.surge == surge.instance else now
    st = view.instances.get(surge.instance)
    reason = ""
    if st is not None and st.phase is Phase.FAILED:
        reason = f"new replica {surge.instance} on {surge.node} failed: {st.message or 'no message'}"
    elif now - placed_at >= timing.ready_timeout_s:
        seen = f"{st.phase.value}{': ' + st.message if st.message else ''}" if st is not None else "not started"
        reason = (f"new replica {surge.instance} on {surge.node} not ready after {timing.ready_timeout_s:.0f} s "
                  f"({seen})")
    if not reason:
        return RolloutPlan(extra=1, status=status(RolloutState.ROLLING, surge=surge.instance,
                                                  surge_since=placed_at))
    record = view.record
    if record is not None and not same_engine(record.previous, model):
        back = replace(record.previous, replicas=model.replicas, scaling=model.scaling)
        return RolloutPlan(retire=tuple(p.instance for p in waiting), rollback=back, finish=True,
                           status=status(RolloutState.ROLLED_BACK, reason=reason),
                           notes=(f"rolling back to the previous spec: {reason}",))
    return RolloutPlan(retire=tuple(p.instance for p in waiting if p.instance == surge.instance),
                       finish=record is not None, status=status(RolloutState.FAILED, reason=reason),
                       notes=(f"rollout failed, {len(stale)} replica(s) left as they were: {reason}",))


def _settled(st: InstanceStatus | None, now: float, settle_s: float) -> bool:
    return st is not None and st.phase is Phase.READY and now - st.since >= settle_s
