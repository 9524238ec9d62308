"""The scheduler's side of elastic capacity: mirrors of scale states, load reports and wake requests in;
each pass, core/scaling.py's decisions per elastic model, the effective specs placement gets, evictions for
models that fit nowhere, and the fenced writes out (scale states, wake requests acted on).

Only the leader acts; a standby keeps the mirrors. Every decision is logged with its reason (structured:
NEBULA_MODEL, NEBULA_SCALE_ACTION) and counted in nebula_scheduler_scaling_decisions{model, action}, once
its write has landed: a deposed leader's decisions count nowhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula.core import keys
from nebula.core.config import SchedulerConfig
from nebula.core.elastic import IdleAction, LoadReport, ScaleState, WakeRequest
from nebula.core.model import InstanceStatus, ModelSpec, Placement
from nebula.core.placement import PlacementResult
from nebula.core.scaling import (
    Decision,
    Fleet,
    Readiness,
    ScalingDefaults,
    Tracker,
    aggregate,
    effective_spec,
    idle_action,
    readiness_by_model,
    step,
)
from nebula.core.scaling_evict import candidates, priority
from nebula.services.cluster.mirror import MirrorState
from nebula.services.cluster.writes import ClusterWrites, Fence

log = logging.getLogger("nebula.scheduler")


def defaults_from(cfg: SchedulerConfig) -> ScalingDefaults:
    return ScalingDefaults(idle_action=IdleAction(cfg.idle_action), target_inflight=cfg.target_inflight,
                           up_window_s=cfg.scale_up_window_s, down_window_s=cfg.scale_down_window_s,
                           cooldown_s=cfg.scale_cooldown_s, low_ratio=cfg.scale_low_ratio,
                           report_stale_s=cfg.load_report_stale_s)


@dataclass
class ScalePlan:
    """One pass's scaling: the state of every elastic model, and what to write for it."""

    now: float
    fleet: Fleet
    states: dict[str, ScaleState]
    writes: dict[str, ScaleState] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def take(self, d: Decision) -> None:
        self.states[d.model] = self.writes[d.model] = d.state
        self.decisions = [x for x in self.decisions if x.model != d.model] + [d]


def effective(models: Mapping[str, ModelSpec], states: Mapping[str, ScaleState]) -> dict[str, ModelSpec]:
    """The specs placement gets: an elastic model at its current count; one at 0 left out (its placements go,
    and it is not pending)."""
    out = {}
    for name, spec in models.items():
        eff = effective_spec(spec, states.get(name))
        if eff is not None:
            out[name] = eff
    return out


def with_sleep(placements: Mapping[str, Placement], states: Mapping[str, ScaleState],
               models: Mapping[str, ModelSpec], defaults: ScalingDefaults) -> dict[str, Placement]:
    """Each placement with its model's sleep level (0 for a model that is not elastic), and sleep mode on for
    the engines of a model whose idle action is sleep (on a GPU: idle_action() says stop for a CPU model)."""
    out = {}
    for inst, p in placements.items():
        st = states.get(p.model.name)
        spec = models.get(p.model.name)
        level = st.sleep_level if st is not None else 0
        mode = spec is not None and spec.scaling is not None and spec.scaling.idle_unload_s is not None \
            and idle_action(spec, defaults)[0] is IdleAction.SLEEP
        out[inst] = p if (p.sleep_level, p.sleep_mode) == (level, mode) else replace(p, sleep_level=level,
                                                                                        sleep_mode=mode)
    return out


class Scaler:
    def __init__(self, writes: ClusterWrites, registry: CollectorRegistry, defaults: ScalingDefaults, *,
                 notify: Callable[[], None], wall: Callable[[], float] = time.time, evict_quiet_s: float = 60.0,
                 pass_s: float = 5.0, leading: Callable[[], bool] = lambda: True) -> None:
        self.writes = writes
        self.defaults = defaults
        self.notify = notify
        self.wall = wall
        self.evict_quiet_s = evict_quiet_s
        self.pass_s = pass_s
        self.scale: dict[str, ScaleState] = {}
        self.reports: dict[str, LoadReport] = {}
        self.wakes: dict[str, WakeRequest] = {}
        self.trackers: dict[str, Tracker] = {}
        self.started = wall()
        self.seen: set[str] = set()
        self.decisions = Counter("nebula_scheduler_scaling_decisions", "Elastic capacity decisions this scheduler "
                                 "made (and wrote) as leader, by model and action", ["model", "action"],
                                 registry=registry)
        registry.register(_ScaleCollector(self, leading))

    # --- mirrored inputs ----------------------------------------------------------------------------
    def on_scale(self, state: MirrorState[ScaleState]) -> None:
        self.scale = {s.model: s for s in state.records.values()}
        self._seen("scale")

    def on_load(self, state: MirrorState[LoadReport]) -> None:
        # No pass per report (every gateway worker publishes every few seconds): the timer reads them.
        self.reports = dict(state.records)
        self._seen("load")

    def on_wake(self, state: MirrorState[WakeRequest]) -> None:
        self.wakes = {w.model: w for w in state.records.values()}
        self._seen("wake")
        if self.wakes:
            self.notify()  # a wake is a client waiting: act now, not on the timer

    def _seen(self, what: str) -> None:
        if what not in self.seen:
            self.seen.add(what)
            self.notify()

    @property
    def ready(self) -> bool:
        return self.seen >= {"scale", "load", "wake"}

    def reset(self) -> None:
        """Leadership (re)gained: idleness counts from now, and load windows start again."""
        self.started = self.wall()
        self.trackers = {}

    def tick_s(self, models: Mapping[str, ModelSpec]) -> float | None:
        """How soon the next time-based pass is due (None: no elastic model)."""
        return self.pass_s if any(m.scaling is not None for m in models.values()) else None

    # --- one pass -----------------------------------------------------------------------------------
    def plan(self, models: Mapping[str, ModelSpec], instances: Iterable[InstanceStatus] = ()) -> ScalePlan:
        """`instances`: every instance's reported status (idleness counts from a model's latest ready replica)."""
        now = self.wall()
        fleet = aggregate(self.reports.values(), now, self.defaults.report_stale_s)
        plan = ScalePlan(now=now, fleet=fleet, states={})
        readiness = readiness_by_model(instances)
        for name, spec in sorted(models.items()):
            if spec.scaling is None:
                continue
            stored = self.scale.get(name)
            out = step(spec, stored, fleet, wake=name in self.wakes, tracker=self.trackers.get(name, Tracker()),
                       now=now, started=self.started, defaults=self.defaults,
                       readiness=readiness.get(name, Readiness()))
            self.trackers[name] = out.tracker
            plan.states[name] = out.state
            if out.state != stored:
                plan.writes[name] = out.state
            if out.decision is not None:
                plan.decisions.append(out.decision)
            if out.wake_done:
                plan.deletes.append(keys.wake_key(name))
        for name in self.scale:
            if name not in plan.states:  # unloaded, or no longer elastic: a reload starts from its spec again
                plan.deletes.append(keys.scale_key(name))
        for name in self.wakes:
            if name not in plan.states:  # nothing to wake: the gateway answers 404 or routes to a fixed model
                plan.deletes.append(keys.wake_key(name))
        for name in set(self.trackers) - set(plan.states):
            del self.trackers[name]
        return plan

    def evict(self, plan: ScalePlan, models: Mapping[str, ModelSpec], result: PlacementResult,
              place_with: Callable[[Mapping[str, ModelSpec]], PlacementResult]) -> PlacementResult:
        """For each model that fits nowhere (highest priority first), the first idle model of lower priority
        whose eviction lets it place more replicas (tried on a copy: an eviction that frees nothing it can use
        is never made). Returns the placement result after the evictions kept."""
        for name in sorted(result.pending, key=lambda n: (-priority(models[n]), n) if n in models else (0, n)):
            for d in candidates(name, models, plan.states, plan.fleet, now=plan.now, quiet_s=self.evict_quiet_s):
                trial = place_with(effective(models, {**plan.states, d.model: d.state}))
                if _placed(trial, name) > _placed(result, name):
                    plan.take(d)
                    result = trial
                    break
        return result

    async def apply(self, fence: Fence, plan: ScalePlan) -> bool:
        """Write the plan under the fence; then log and count its decisions. False: the fence fell."""
        if not plan.writes and not plan.deletes:
            return True
        if not await self.writes.apply_scaling(fence, list(plan.writes.values()), plan.deletes):
            return False
        # Our own view at once, before the mirrors bring it back (the next pass must not act on it again).
        self.scale.update(plan.writes)
        for key in plan.deletes:
            if key.startswith(keys.SCALE):
                self.scale.pop(key.removeprefix(keys.SCALE), None)
            else:
                self.wakes.pop(key.removeprefix(keys.WAKE), None)
        for d in plan.decisions:
            self.decisions.labels(d.model, d.action.value).inc()
            log.info("scaling %s: %s: %s", d.model, d.action.value, d.reason,
                     extra={"NEBULA_MODEL": d.model, "NEBULA_SCALE_ACTION": d.action.value,
                            "NEBULA_SCALE_REPLICAS": d.state.replicas, "NEBULA_SCALE_SLEEP": d.state.sleep_level,
                            "NEBULA_SCALE_PATH": d.path or d.action.value})
        for name, st in plan.writes.items():
            if not any(d.model == name for d in plan.decisions):
                log.info("scale state of %s: %d replicas (%s)", name, st.replicas, st.reason,
                         extra={"NEBULA_MODEL": name})
        return True


class _ScaleCollector(Collector):
    """Each elastic model's wanted replicas and sleep level, read from the scale states at scrape time (leader
    only, as the other state gauges: a standby's copy would count twice in a sum over schedulers)."""

    def __init__(self, scaler: Scaler, leading: Callable[[], bool]) -> None:
        self._scaler = scaler
        self._leading = leading

    def collect(self) -> Iterator[Metric]:
        wanted = GaugeMetricFamily("nebula_scheduler_scale_replicas", "Replicas the scheduler wants of each "
                                   "elastic model now (0: idle, unloaded; leader only)", labels=["model"])
        asleep = GaugeMetricFamily("nebula_scheduler_scale_sleep_level", "Each elastic model's sleep level "
                                   "(0 awake, 1 or 2 asleep; leader only)", labels=["model"])
        if self._leading():
            for name, st in sorted(self._scaler.scale.items()):
                wanted.add_metric([name], st.replicas)
                asleep.add_metric([name], st.sleep_level)
        yield from (wanted, asleep)


def _placed(result: PlacementResult, model: str) -> int:
    return sum(1 for p in result.placements.values() if p.model.name == model)


