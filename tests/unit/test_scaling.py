"""Elastic capacity's pure decisions on a controllable clock: idleness, wake, autoscaling (no flapping)."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nebula.core.elastic import IdleAction, LoadReport, ModelLoad, ScaleState
from nebula.core.model import InstanceStatus, ModelSpec, Phase
from nebula.core.scaling import (
    Action,
    Decision,
    Fleet,
    Load,
    Readiness,
    ScalingDefaults,
    Step,
    Tracker,
    aggregate,
    clamp,
    effective_spec,
    readiness_by_model,
    step,
)

D = ScalingDefaults(up_window_s=30, down_window_s=120, cooldown_s=60, target_inflight=4, report_stale_s=15)
T0 = 1_000_000.0


def spec(replicas: int = 1, gpus: int = 0, **scaling: Any) -> ModelSpec:
    return ModelSpec.from_dict({"name": "m", "source": "/m", "replicas": replicas, "gpus_per_replica": gpus,
                                "scaling": scaling})


def fleet(**load: Any) -> Fleet:
    return Fleet(loads={"m": Load(**load)}, reporters=1)


def run(s: ModelSpec, stored: ScaleState | None, f: Fleet, now: float, *, wake: bool = False,
        tracker: Tracker | None = None, started: float = T0) -> Step:
    return step(s, stored, f, wake=wake, tracker=tracker or Tracker(), now=now, started=started, defaults=D)


def state(replicas: int, since: float = T0, sleep: int = 0) -> ScaleState:
    return ScaleState(model="m", replicas=replicas, sleep_level=sleep, since=since)


# --- load reports --------------------------------------------------------------------------------------
def report(reporter: str, at: float, **models: ModelLoad) -> LoadReport:
    return LoadReport(reporter=reporter, at=at, models=models)


def test_fresh_reports_are_summed_and_stale_ones_ignored() -> None:
    f = aggregate([report("a.1", T0 - 5, m=ModelLoad(inflight=2, held=1, waiting=3, running=2, kv_cache=0.2,
                                                     last_request=T0 - 6)),
                   report("b.2", T0 - 1, m=ModelLoad(inflight=1, kv_cache=0.7, last_request=T0 - 2)),
                   report("c.3", T0 - 60, m=ModelLoad(inflight=50, last_request=T0 - 1))], T0, 15)
    assert f.reporters == 2
    assert f.load("m") == Load(inflight=3, held=1, waiting=3, running=2, kv_cache=0.7, last_request=T0 - 2)
    assert f.load("other") == Load()


# --- idleness -------------------------------------------------------------------------------------------
def test_an_idle_model_unloads_after_idle_unload_s_and_not_before() -> None:
    s = spec(idle_unload_s=600)
    quiet = fleet(last_request=T0 + 100)
    assert run(s, state(1), quiet, T0 + 699).decision is None
    d = run(s, state(1), quiet, T0 + 700).decision
    assert d is not None and d.action is Action.UNLOAD and d.state.replicas == 0 and d.path == "stop"
    assert "no inference request for 10m" in d.reason and "unloaded to 0" in d.reason


def test_a_running_stream_or_held_request_keeps_it_loaded() -> None:
    s = spec(idle_unload_s=60)
    for busy in ({"inflight": 1}, {"running": 1}, {"waiting": 2}):
        assert run(s, state(1), fleet(**busy), T0 + 10_000).decision is None, busy


def test_a_scheduler_restart_or_a_fresh_load_never_unloads_at_once() -> None:
    s = spec(idle_unload_s=60)
    # No request ever, state written long ago, but this scheduler started just now.
    assert run(s, state(1, since=T0 - 10_000), fleet(), T0 + 30, started=T0).decision is None
    # A fresh load (no stored state) starts its clock now.
    first = run(s, None, fleet(), T0 + 10_000, started=T0)
    assert first.decision is None and first.state.replicas == 1 and first.state.since == T0 + 10_000
    assert run(s, first.state, fleet(), T0 + 10_059).decision is None
    d = run(s, first.state, fleet(), T0 + 10_060).decision
    assert d is not None and d.action is Action.UNLOAD and "for 60s since the last change" in d.reason
    d = run(s, state(1, since=T0 - 10_000), fleet(), T0 + 60, started=T0).decision
    assert d is not None and "since this scheduler took the lead" in d.reason


def test_a_replica_on_its_way_is_never_idle_and_idleness_counts_from_its_readiness() -> None:
    s = spec(idle_unload_s=60)
    # Loaded long ago, no request ever: still starting (a CPU start outlasting idle_unload_s) -> kept.
    starting = step(s, state(1), fleet(), wake=False, tracker=Tracker(), now=T0 + 600, started=T0, defaults=D,
                    readiness=Readiness(coming=True))
    assert starting.decision is None and starting.state.replicas == 1
    # Ready at T0 + 600: its idle clock starts there.
    ready = Readiness(ready_since=T0 + 600)
    kept = step(s, state(1), fleet(), wake=False, tracker=Tracker(), now=T0 + 659, started=T0, defaults=D,
                readiness=ready)
    assert kept.decision is None
    d = step(s, state(1), fleet(), wake=False, tracker=Tracker(), now=T0 + 660, started=T0, defaults=D,
             readiness=ready).decision
    assert d is not None and d.action is Action.UNLOAD and "since its replica became ready" in d.reason


def test_readiness_comes_from_the_instances_phases() -> None:
    def inst(name: str, model: str, phase: Phase, since: float) -> InstanceStatus:
        return InstanceStatus(instance=name, model=model, node="a", phase=phase, endpoint="http://a", since=since)

    got = readiness_by_model([inst("m", "m", Phase.READY, 5.0), inst("m:1", "m", Phase.READY, 9.0),
                              inst("n", "n", Phase.STARTING, 3.0), inst("o", "o", Phase.FAILED, 4.0),
                              inst("p", "p", Phase.READY, 2.0), inst("p:1", "p", Phase.DOWNLOADING, 1.0)])
    assert got == {"m": Readiness(ready_since=9.0), "n": Readiness(coming=True),
                   "p": Readiness(ready_since=2.0, coming=True)}


def test_without_a_fresh_load_report_nothing_is_judged_idle() -> None:
    assert run(spec(idle_unload_s=60), state(1), Fleet(), T0 + 10_000).decision is None


def test_sleep_keeps_the_replicas_and_sets_the_level_on_gpu() -> None:
    s = spec(gpus=1, idle_unload_s=60, idle_action="sleep", sleep_level=2)
    d = run(s, state(1), fleet(), T0 + 61).decision
    assert d is not None and d.action is Action.SLEEP and d.path == "sleep"
    assert (d.state.replicas, d.state.sleep_level) == (1, 2)


def test_sleep_on_a_cpu_model_falls_back_to_stop_and_says_so() -> None:
    d = run(spec(idle_unload_s=60, idle_action="sleep"), state(1), fleet(), T0 + 61).decision
    assert d is not None and d.action is Action.UNLOAD and d.state.replicas == 0
    assert d.path.startswith("stop") and "CUDA-only" in d.reason


def test_the_fleet_default_idle_action_applies_when_the_model_has_none() -> None:
    s = spec(gpus=1, idle_unload_s=60)
    sleepy = ScalingDefaults(idle_action=IdleAction.SLEEP)
    d = step(s, state(1), fleet(), wake=False, tracker=Tracker(), now=T0 + 61, started=T0, defaults=sleepy).decision
    assert d is not None and d.action is Action.SLEEP and d.state.sleep_level == 1


def test_a_stop_with_min_above_zero_never_unloads() -> None:
    assert run(spec(min_replicas=1, idle_unload_s=60), state(1), fleet(), T0 + 10_000).decision is None


# --- wake -----------------------------------------------------------------------------------------------
def test_a_wake_request_brings_an_idle_model_to_max_of_1_and_min() -> None:
    w = run(spec(idle_unload_s=60), state(0), fleet(), T0 + 5, wake=True)
    assert w.wake_done and w.decision is not None and w.decision.action is Action.WAKE
    assert w.state.replicas == 1 and w.state.sleep_level == 0
    assert w.decision.reason.startswith("woken by a wake request")


def test_held_requests_wake_even_without_a_wake_request() -> None:
    w = run(spec(idle_unload_s=60), state(0), fleet(held=3), T0 + 5)
    assert w.decision is not None and w.decision.action is Action.WAKE and not w.wake_done
    assert "3 requests held" in w.decision.reason


def test_a_wake_ends_sleep_and_keeps_the_count() -> None:
    w = run(spec(replicas=2, gpus=1, max_replicas=3, idle_unload_s=60, idle_action="sleep"),
            state(2, sleep=1), fleet(), T0 + 5, wake=True)
    assert (w.state.replicas, w.state.sleep_level) == (2, 0)


def test_a_wake_request_for_an_awake_model_is_only_consumed() -> None:
    w = run(spec(idle_unload_s=60), state(1), fleet(inflight=1), T0 + 5, wake=True)
    assert w.wake_done and w.decision is None and w.state == state(1)


def test_an_idle_model_at_zero_stays_there() -> None:
    w = run(spec(idle_unload_s=60), state(0), fleet(), T0 + 10_000)
    assert w.decision is None and w.state.replicas == 0


# --- bounds ---------------------------------------------------------------------------------------------
def test_a_stored_count_outside_changed_bounds_is_clamped() -> None:
    s = spec(replicas=2, min_replicas=2, max_replicas=3)
    assert clamp(s, state(5), T0).replicas == 3
    assert clamp(s, state(0), T0).replicas == 2
    assert clamp(spec(idle_unload_s=5), state(0), T0).replicas == 0
    assert effective_spec(s, state(3)) is not None and effective_spec(s, state(3)).replicas == 3  # type: ignore
    assert effective_spec(spec(idle_unload_s=5), state(0)) is None


# --- autoscaling ----------------------------------------------------------------------------------------
def simulate(s: ModelSpec, load_at: Any, seconds: int, tick: int = 5) -> tuple[list[Decision], list[int]]:
    stored: ScaleState | None = None
    tracker = Tracker()
    decisions: list[Decision] = []
    counts: list[int] = []
    for t in range(0, seconds, tick):
        now = T0 + t
        current = stored.replicas if stored else s.replicas
        inflight = load_at(t, current)
        out = run(s, stored, fleet(inflight=inflight, last_request=now), now, tracker=tracker)
        stored, tracker = out.state, out.tracker
        if out.decision:
            decisions.append(out.decision)
        counts.append(stored.replicas)
    return decisions, counts


def test_a_load_step_scales_1_to_n_and_back() -> None:
    s = spec(min_replicas=1, max_replicas=4, idle_unload_s=3600)
    # 20 requests in flight for 10 minutes (5 per replica at 4 replicas: above target 4), then 0.
    decisions, counts = simulate(s, lambda t, n: 20 if 60 <= t < 660 else 0, 1800)
    ups = [d for d in decisions if d.action is Action.UP]
    downs = [d for d in decisions if d.action is Action.DOWN]
    assert max(counts) == 4 and counts[-1] == 1
    assert len(ups) == 3 and len(downs) == 3 and len(decisions) == 6
    assert "1 -> 2 replicas" in ups[0].reason and "target 4" in ups[0].reason


def test_an_oscillating_load_makes_no_flapping() -> None:
    s = spec(min_replicas=1, max_replicas=4, idle_unload_s=3600)
    # Load swings every 20 s between well above and well below the target: shorter than either window.
    decisions, _ = simulate(s, lambda t, n: 12 * n if (t // 20) % 2 else 0, 3600)
    assert decisions == []


def test_a_load_near_the_target_moves_nothing() -> None:
    s = spec(replicas=2, min_replicas=1, max_replicas=4)
    decisions, counts = simulate(s, lambda t, n: 3 * n, 3600)  # 3 per replica: not above 4, not below 1.2
    assert decisions == [] and set(counts) == {2}


def test_kv_cache_pressure_adds_a_replica_alone() -> None:
    s = spec(min_replicas=1, max_replicas=2)
    tr = run(s, state(1), fleet(inflight=1, kv_cache=0.95), T0 + 100).tracker
    d = run(s, state(1), fleet(inflight=1, kv_cache=0.95), T0 + 130, tracker=tr).decision
    assert d is not None and d.action is Action.UP and "KV cache 95%" in d.reason


def test_autoscaling_never_goes_below_one_nor_above_max() -> None:
    s = spec(min_replicas=0, max_replicas=2, idle_unload_s=36_000)
    decisions, counts = simulate(s, lambda t, n: 0 if t > 100 else 100, 3600)
    assert min(counts) == 1 and max(counts) == 2
    assert all(d.action in (Action.UP, Action.DOWN) for d in decisions)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=10, max_size=80))
def test_no_two_changes_within_the_cool_down(loads: list[int]) -> None:
    s = spec(min_replicas=1, max_replicas=6)
    decisions, counts = simulate(s, lambda t, n: loads[(t // 30) % len(loads)], 3600)
    times = [d.state.since for d in decisions]
    assert all(b - a >= D.cooldown_s for a, b in itertools.pairwise(times))
    assert all(1 <= c <= 6 for c in counts)
