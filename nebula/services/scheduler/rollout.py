"""The scheduler's side of rolling replaces and node drains: feeds core/rollout.plan_rollout from its mirrors
and applies what it decides (retire placements, surge through place(), statuses, rollbacks), fenced.

The scheduler calls `plan()` before place() each pass, hands place() the surge and the drained nodes, deletes
the retired placements with the rest of the difference, then calls `apply()` for the records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from nebula.core import records as kinds
from nebula.core.drain import stranded
from nebula.core.model import InstanceStatus, ModelSpec, NodeRecord, Placement
from nebula.core.rollout import RolledBack, RolloutPlan, RolloutTiming, RolloutView, plan_rollout
from nebula.core.rollout_records import DrainRecord, RolloutRecord, RolloutState, RolloutStatus
from nebula.core.store import Store
from nebula.services.cluster.mirror import Mirror, MirrorMetrics, MirrorState
from nebula.services.cluster.rollout_writes import RolloutWrites
from nebula.services.cluster.writes import Fence

log = logging.getLogger("nebula.scheduler")
NEEDS = frozenset({"instances", "rollouts", "rollout-status", "drains"})


@dataclass(frozen=True)
class PassPlan:
    """What the rollout planner decided for one scheduler pass."""

    plans: Mapping[str, RolloutPlan]
    retire: frozenset[str]
    surge: Mapping[str, int]
    orphans: tuple[str, ...] = ()
    """Rollout records of models that are no longer loaded."""


class Rollouts:
    def __init__(self, store: Store, timing: RolloutTiming | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.timing = timing or RolloutTiming()
        self.clock = clock
        self.writes = RolloutWrites(store)
        self.instances: dict[str, InstanceStatus] = {}
        self.records: dict[str, RolloutRecord] = {}
        self.statuses: dict[str, RolloutStatus] = {}
        self.drains: dict[str, DrainRecord] = {}
        self.seen: set[str] = set()
        self._written: dict[str, RolloutStatus] = {}  # ours, fresher than the mirror until it catches up
        self._ended: dict[str, tuple[str, float, RolloutState]] = {}  # the last end counted, per model
        self._rolled_back: dict[str, RolledBack] = {}  # ours, until the models and rollouts mirrors show them
        self.changed: Callable[[], None] = lambda: None
        """Called after each mirrored change (the scheduler sets it to wake its pass)."""
        self.finished: Callable[[str, RolloutState], None] = lambda model, outcome: None
        """Called once per rollout that ended, with its outcome, after its record was written (for a metric)."""

    # --- mirrored inputs (the scheduler's wake follows each) ------------------------------------------------
    def on_instances(self, state: MirrorState[InstanceStatus]) -> None:
        self.instances = {s.instance: s for s in state.records.values()}
        self._seen("instances")

    def on_rollouts(self, state: MirrorState[RolloutRecord]) -> None:
        self.records = {r.model: r for r in state.records.values()}
        self._seen("rollouts")

    def on_statuses(self, state: MirrorState[RolloutStatus]) -> None:
        self.statuses = {s.model: s for s in state.records.values()}
        self._written = {m: s for m, s in self._written.items() if self.statuses.get(m) != s}
        self._seen("rollout-status")

    def on_drains(self, state: MirrorState[DrainRecord]) -> None:
        self.drains = {d.node: d for d in state.records.values()}
        self._seen("drains")

    def _seen(self, what: str) -> None:
        self.seen.add(what)
        self.changed()

    def mirrors(self, store: Store, metrics: MirrorMetrics) -> list[Mirror[Any]]:
        """The mirrors that feed it (the scheduler runs them with its own)."""
        return [Mirror(store, kinds.INSTANCES, metrics, on_change=self.on_instances),
                Mirror(store, kinds.ROLLOUTS, metrics, on_change=self.on_rollouts),
                Mirror(store, kinds.ROLLOUT_STATUS, metrics, on_change=self.on_statuses),
                Mirror(store, kinds.DRAINS, metrics, on_change=self.on_drains)]

    @property
    def ready(self) -> bool:
        return self.seen >= NEEDS

    @property
    def drained(self) -> frozenset[str]:
        return frozenset(self.drains)

    def reset(self) -> None:
        """Leadership (re)gained: only the store's statuses count."""
        self._written.clear()
        self._rolled_back.clear()

    # --- one pass -----------------------------------------------------------------------------------------
    def plan(self, models: Mapping[str, ModelSpec], placements: Mapping[str, Placement],
             nodes: Mapping[str, NodeRecord]) -> PassPlan:
        now = self.clock()
        forced = frozenset(n for n, d in self.drains.items() if d.force)
        stop_now = stranded(models, nodes, placements.values(), forced, self.drained)
        if stop_now:
            log.warning("force-drained: stopping %s (no other node can hold them)", ", ".join(sorted(stop_now)))
            placements = {i: p for i, p in placements.items() if i not in stop_now}
        by_model: dict[str, dict[str, Placement]] = {}
        for p in placements.values():
            by_model.setdefault(p.model.name, {})[p.instance] = p
        plans: dict[str, RolloutPlan] = {}
        self._rolled_back = {m: rb for m, rb in self._rolled_back.items()
                             if m in models and not rb.mirrored(models[m], self.records.get(m))}
        for name, model in sorted(models.items()):
            view = RolloutView(model=model, placements=by_model.get(name, {}), instances=self.instances, now=now,
                               record=self.records.get(name), status=self._status(name), drained=self.drained,
                               rolled_back=self._rolled_back.get(name))
            plan = plan_rollout(view, self.timing)
            if plan != RolloutPlan():
                plans[name] = plan
        retire = frozenset(i for p in plans.values() for i in p.retire) | stop_now
        surge = {m: p.extra for m, p in plans.items() if p.extra}
        orphans = tuple(sorted(set(self.records) - set(models)))
        return PassPlan(plans=plans, retire=retire, surge=surge, orphans=orphans)

    def held_ports(self, placements: Mapping[str, Placement]) -> dict[str, set[int]]:
        """Ports of engines still reported without a placement (draining): a new replica must not take them."""
        out: dict[str, set[int]] = {}
        for s in self.instances.values():
            port = s.endpoint.rpartition(":")[2]
            if s.instance not in placements and port.isdigit():
                out.setdefault(s.node, set()).add(int(port))
        return out

    def taken(self) -> frozenset[str]:
        """Instance names still reported by an agent: place() must not give them to a new replica."""
        return frozenset(self.instances)

    async def apply(self, fence: Fence, models: Mapping[str, ModelSpec], decided: PassPlan) -> bool:
        """Write what the planner decided; False once the fence has fallen (nothing more written)."""
        for name, plan in sorted(decided.plans.items()):
            for note in plan.notes:
                log.info("rollout of %s: %s", name, note, extra={"NEBULA_MODEL": name})
            if plan.rollback is not None and plan.status is not None:
                record = self.records.get(name)
                done = await self.writes.roll_back(fence, models[name], plan.rollback, plan.status)
                if done is False:
                    return False
                if done:
                    log.warning("model %s rolled back to its previous spec: %s", name, plan.status.reason,
                                extra={"NEBULA_MODEL": name})
                    self._written[name] = plan.status
                    if record is not None:
                        self._rolled_back[name] = RolledBack(left=plan.status.target, started=record.started)
                    self._count_end(name, plan.status)  # planned as ROLLED_BACK (core/rollout.py)
                continue
            if plan.status is None or (not plan.finish and self._same(plan.status, self._status(name))):
                continue
            if not await self.writes.report(fence, plan.status, finish=plan.finish):
                return False
            self._written[name] = plan.status
            if plan.finish:
                self._count_end(name, plan.status)
        for name in decided.orphans:
            if not await self.writes.forget(fence, name):
                return False
        return True

    def _count_end(self, model: str, status: RolloutStatus) -> None:
        # A pass before the mirror shows the record gone plans the same end again: count each rollout once.
        end = (status.target, status.since, status.state)
        if self._ended.get(model) != end:
            self._ended[model] = end
            self.finished(model, status.state)

    def _status(self, model: str) -> RolloutStatus | None:
        return self._written.get(model) or self.statuses.get(model)

    @staticmethod
    def _same(a: RolloutStatus, b: RolloutStatus | None) -> bool:
        return b is not None and replace(a, updated=0.0) == replace(b, updated=0.0)
