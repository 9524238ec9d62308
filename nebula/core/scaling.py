"""Elastic capacity's decisions: when an elastic model goes idle (stop or sleep), wakes, or gains or loses a
replica. Pure: every input, the clock included, is passed in, and what must be remembered between passes
(when a condition started, when the last change was) goes in and out as a `Tracker` value.

Times are wall-clock seconds (the gateways' reports carry wall-clock times). The scheduler calls `step`
for each elastic model on every pass; core/scaling_evict.py decides which idle model of lower priority
gives way when another fits nowhere.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from nebula.core.elastic import IdleAction, LoadReport, ModelLoad, ScaleState, ScalingPolicy
from nebula.core.model import InstanceStatus, ModelSpec, Phase


@dataclass(frozen=True)
class ScalingDefaults:
    """The fleet's defaults and timings ([scheduler] config)."""

    idle_action: IdleAction = IdleAction.STOP
    target_inflight: float = 4.0
    """Requests (in flight or queued) per replica that autoscaling aims at."""
    up_window_s: float = 30.0
    """Load must stay above the target this long before a replica is added."""
    down_window_s: float = 120.0
    """Load must stay below target x low_ratio this long before a replica is removed."""
    cooldown_s: float = 60.0
    """No autoscaling change within this long of the previous change."""
    low_ratio: float = 0.3
    """Hysteresis: 'below' means below target x low_ratio, so a load near the target moves nothing."""
    kv_cache_high: float = 0.9
    """KV-cache use (the fullest replica) above which the model counts as loaded whatever its request count."""
    report_stale_s: float = 15.0
    """Load reports older than this are ignored (their gateway worker stopped publishing)."""


# One model's load summed over every fresh report has the shape of one report's: the same type.
Load = ModelLoad


@dataclass(frozen=True)
class Fleet:
    """What the fresh load reports say, and whether there are any (no fresh report: no view of traffic)."""

    loads: Mapping[str, Load] = field(default_factory=dict)
    reporters: int = 0

    def load(self, model: str) -> Load:
        return self.loads.get(model, Load())


def aggregate(reports: Iterable[LoadReport], now: float, stale_s: float) -> Fleet:
    """Sum the reports at most `stale_s` old (a report from the future, a skewed clock, counts as fresh)."""
    sums: dict[str, Load] = {}
    fresh = 0
    for report in reports:
        if now - report.at > stale_s:
            continue
        fresh += 1
        for name, m in report.models.items():
            s = sums.get(name, Load())
            sums[name] = Load(inflight=s.inflight + m.inflight, held=s.held + m.held, waiting=s.waiting + m.waiting,
                              running=s.running + m.running, kv_cache=max(s.kv_cache, m.kv_cache),
                              last_request=max(s.last_request, m.last_request))
    return Fleet(loads=sums, reporters=fresh)


class Action(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    UNLOAD = "unload"
    SLEEP = "sleep"
    WAKE = "wake"
    EVICT = "evict"


@dataclass(frozen=True)
class Decision:
    """One change to a model's scale state, with the reason people read in the log and in `nebula status`."""

    model: str
    action: Action
    state: ScaleState
    reason: str
    path: str = ""
    """For idle decisions, which path ran: 'stop', 'sleep', or 'stop (sleep needs a GPU)'."""


@dataclass(frozen=True)
class Tracker:
    """What one model's decisions remember between passes (kept by the scheduler, reset with leadership)."""

    high_since: float | None = None
    """When load went above the target (and has stayed there since)."""
    low_since: float | None = None
    """When load went below target x low_ratio (and has stayed there since)."""


@dataclass(frozen=True)
class Readiness:
    """What the model's replicas are doing, from their agents' reports: idleness counts from the latest replica
    to become ready, and a replica still on its way makes a model never idle (a start longer than
    idle_unload_s would otherwise be unloaded before it could answer the request it was started for)."""

    ready_since: float = 0.0
    """Wall-clock time the latest READY replica became ready; 0: none."""
    coming: bool = False
    """Some replica is pending, downloading or starting."""


@dataclass(frozen=True)
class Step:
    """What one pass decided for one model: the scale state to hold (written when it differs from the stored
    one), the decision behind a change (None: no decision, perhaps a first or corrected state), whether the
    model's wake request has been acted on (delete it), and the tracker for the next pass."""

    state: ScaleState
    decision: Decision | None
    tracker: Tracker
    wake_done: bool = False


def idle_action(spec: ModelSpec, defaults: ScalingDefaults) -> tuple[IdleAction, str]:
    """The idle action that runs for `spec`, and the path's name: sleep needs vLLM's sleep mode, which is
    CUDA-only, so a model that runs on CPU (no GPU per replica) stops instead."""
    policy = spec.scaling or ScalingPolicy()
    action = policy.idle_action or defaults.idle_action
    if action is IdleAction.SLEEP and spec.gpus_per_replica == 0:
        return IdleAction.STOP, "stop (sleep needs a GPU: vLLM's sleep mode is CUDA-only)"
    return action, action.value


def clamp(spec: ModelSpec, stored: ScaleState | None, now: float) -> ScaleState:
    """The scale state to start the pass from: the stored one within the policy's bounds (0 only when min is
    0), or the spec's count when none is stored (a fresh load: `since` = now, so it never unloads at once)."""
    policy = spec.scaling or ScalingPolicy()
    if stored is None:
        return ScaleState(model=spec.name, replicas=spec.replicas, reason=f"loaded with {spec.replicas} "
                          f"replica{'s' if spec.replicas != 1 else ''}", since=now)
    low = policy.min_replicas if stored.replicas or policy.min_replicas else 0
    wanted = min(max(stored.replicas, low), policy.max_replicas)
    sleep = stored.sleep_level if wanted else 0
    if wanted == stored.replicas and sleep == stored.sleep_level:
        return stored
    return ScaleState(model=spec.name, replicas=wanted, sleep_level=sleep, since=now,
                      reason=f"{wanted} replicas: the policy's bounds are {policy.min_replicas}-{policy.max_replicas}")


def step(spec: ModelSpec, stored: ScaleState | None, fleet: Fleet, *, wake: bool, tracker: Tracker, now: float,
         started: float, defaults: ScalingDefaults, readiness: Readiness = Readiness()) -> Step:
    """One pass's decision for the elastic model `spec` (spec.scaling is set).

    Order: a wake (a wake request, or requests held) beats everything; then idleness (no inference request for
    idle_unload_s and nothing in flight); then autoscaling on load between the bounds."""
    state = clamp(spec, stored, now)
    load = fleet.load(spec.name)
    asleep = state.replicas == 0 or state.sleep_level > 0
    if asleep and (wake or load.held):
        return _wake(spec, state, load, wake=wake, now=now)
    if asleep:
        return Step(state, None, Tracker(), wake_done=wake)
    idle = None if readiness.coming else _idle(spec, state, fleet, load, now=now, started=started,
                                               ready_since=readiness.ready_since, defaults=defaults)
    if idle is not None:
        return Step(idle.state, idle, Tracker(), wake_done=wake)
    return _autoscale(spec, state, fleet, load, tracker, now=now, defaults=defaults, wake=wake)


def _wake(spec: ModelSpec, state: ScaleState, load: Load, *, wake: bool, now: float) -> Step:
    policy = spec.scaling or ScalingPolicy()
    why = "a wake request" if wake else f"{load.held} request{'s' if load.held != 1 else ''} held"
    if state.replicas == 0:
        n = max(1, policy.min_replicas)
        reason = f"woken by {why}: {n} replica{'s' if n != 1 else ''} from 0"
        new = ScaleState(model=spec.name, replicas=n, sleep_level=0, reason=reason, since=now)
    else:
        reason = f"woken by {why}: {state.replicas} replica{'s' if state.replicas != 1 else ''} leave sleep " \
                 f"level {state.sleep_level}"
        new = replace(state, sleep_level=0, reason=reason, since=now)
    return Step(new, Decision(spec.name, Action.WAKE, new, reason), Tracker(), wake_done=wake)


def _idle(spec: ModelSpec, state: ScaleState, fleet: Fleet, load: Load, *, now: float, started: float,
          ready_since: float, defaults: ScalingDefaults) -> Decision | None:
    policy = spec.scaling or ScalingPolicy()
    if policy.idle_unload_s is None or load.busy or not fleet.reporters:
        return None  # no fresh report: no view of the traffic, so no reason to believe it idle
    last = max(load.last_request, state.since, started, ready_since)
    quiet = now - last
    if quiet < policy.idle_unload_s:
        return None
    action, path = idle_action(spec, defaults)
    # Which clock ran out, for people: a request's, or (no request since) the last change's or the leader's start.
    counted = "" if last == load.last_request else (
        " since the last change" if last == state.since else
        " since its replica became ready" if last == ready_since else " since this scheduler took the lead")
    heard = f"no inference request for {_duration(quiet)}{counted} (idle_unload_s {_duration(policy.idle_unload_s)})"
    if action is IdleAction.SLEEP:
        reason = f"idle: {heard}; replicas sleep at level {policy.sleep_level}"
        new = replace(state, sleep_level=policy.sleep_level, reason=reason, since=now)
        return Decision(spec.name, Action.SLEEP, new, reason, path=path)
    if policy.min_replicas > 0:
        return None  # stop goes to 0 only when the policy allows it; a model kept at min stays loaded
    reason = f"idle: {heard}; unloaded to 0 replicas" + (f" ({path})" if path != "stop" else "")
    new = ScaleState(model=spec.name, replicas=0, sleep_level=0, reason=reason, since=now)
    return Decision(spec.name, Action.UNLOAD, new, reason, path=path)


def _autoscale(spec: ModelSpec, state: ScaleState, fleet: Fleet, load: Load, tracker: Tracker, *, now: float,
               defaults: ScalingDefaults, wake: bool) -> Step:
    policy = spec.scaling or ScalingPolicy()
    floor, ceiling = max(policy.min_replicas, 1), policy.max_replicas
    if floor >= ceiling or not fleet.reporters:
        return Step(state, None, Tracker(), wake_done=wake)
    target = policy.target_inflight or defaults.target_inflight
    # Held requests are demand too (clients waiting for a replica): leaving them out would read a model whose
    # requests all wait at the gateway as unloaded.
    per = (load.inflight + load.held + load.waiting) / state.replicas
    high = per > target or load.kv_cache > defaults.kv_cache_high
    low = per < target * defaults.low_ratio and load.kv_cache < defaults.kv_cache_high * defaults.low_ratio
    tracker = Tracker(high_since=(tracker.high_since if tracker.high_since is not None else now) if high else None,
                      low_since=(tracker.low_since if tracker.low_since is not None else now) if low else None)
    if now - state.since < defaults.cooldown_s:
        return Step(state, None, tracker, wake_done=wake)
    figures = f"{per:.1f} requests per replica (target {target:g})" + (
        f", KV cache {load.kv_cache:.0%}" if load.kv_cache > defaults.kv_cache_high else "")
    if tracker.high_since is not None and now - tracker.high_since >= defaults.up_window_s and state.replicas < ceiling:
        n = state.replicas + 1
        reason = f"load {figures} for {_duration(now - tracker.high_since)}: {state.replicas} -> {n} replicas"
        new = replace(state, replicas=n, reason=reason, since=now)
        return Step(new, Decision(spec.name, Action.UP, new, reason), Tracker(), wake_done=wake)
    if tracker.low_since is not None and now - tracker.low_since >= defaults.down_window_s and state.replicas > floor:
        n = state.replicas - 1
        reason = f"load {figures}, below {target * defaults.low_ratio:g} for {_duration(now - tracker.low_since)}: " \
                 f"{state.replicas} -> {n} replicas"
        new = replace(state, replicas=n, reason=reason, since=now)
        return Step(new, Decision(spec.name, Action.DOWN, new, reason), Tracker(), wake_done=wake)
    return Step(state, None, tracker, wake_done=wake)


def effective_spec(spec: ModelSpec, state: ScaleState | None) -> ModelSpec | None:
    """The spec place() gets: an elastic model's current count (None at 0: its placements go)."""
    if spec.scaling is None or state is None:
        return spec
    if state.replicas == 0:
        return None
    return spec if spec.replicas == state.replicas else replace(spec, replicas=state.replicas)


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"

def readiness_by_model(instances: Iterable[InstanceStatus]) -> dict[str, Readiness]:
    """Each model's Readiness from its instances' reported phases."""
    ready: dict[str, float] = {}
    coming: set[str] = set()
    for i in instances:
        if i.phase is Phase.READY:
            ready[i.model] = max(ready.get(i.model, 0.0), i.since)
        elif i.phase in (Phase.PENDING, Phase.DOWNLOADING, Phase.STARTING):
            coming.add(i.model)
    return {m: Readiness(ready_since=ready.get(m, 0.0), coming=m in coming) for m in set(ready) | coming}

