"""core/rollout.plan_rollout: the rolling replace, step by step, and simulated to the end under hypothesis."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from nebula.core.model import InstanceStatus, ModelSpec, NodeRecord, Phase, Placement
from nebula.core.placement import place
from nebula.core.rollout import (
    RolledBack,
    RolloutPlan,
    RolloutTiming,
    RolloutView,
    engine_fingerprint,
    free_instances,
    plan_rollout,
    same_engine,
)
from nebula.core.rollout_records import RolloutRecord, RolloutState, RolloutStatus

T = RolloutTiming(settle_s=5.0, ready_timeout_s=100.0, retry_after_s=50.0)
OLD = ModelSpec.from_dict({"name": "m", "source": "/m", "replicas": 2})
NEW = replace(OLD, engine_args=("--enforce-eager",))


def placement(inst: str, spec: ModelSpec, node: str = "n1", port: int = 18000) -> Placement:
    return Placement(instance=inst, node=node, model=replace(spec, replicas=1, scaling=None), port=port)


def ready(inst: str, since: float = 0.0, phase: Phase = Phase.READY, message: str = "") -> InstanceStatus:
    return InstanceStatus(instance=inst, model="m", node="n1", phase=phase, endpoint="http://x", since=since,
                          message=message)


def view(placements: list[Placement], instances: list[InstanceStatus], now: float = 1000.0,
         model: ModelSpec = NEW, record: RolloutRecord | None = None, status: RolloutStatus | None = None,
         drained: frozenset[str] = frozenset()) -> RolloutView:
    return RolloutView(model=model, placements={p.instance: p for p in placements},
                       instances={i.instance: i for i in instances}, now=now, record=record, status=status,
                       drained=drained)


RECORD = RolloutRecord(model="m", previous=OLD, target=NEW, started=900.0, by="admin")
TWO_OLD = [placement("m", OLD), placement("m:1", OLD, port=18001)]


def test_what_restarts_an_engine() -> None:
    assert same_engine(OLD, replace(OLD, replicas=5, labels={"zone": "a"}))
    assert not same_engine(OLD, NEW)
    assert not same_engine(OLD, replace(OLD, revision="v2"))
    assert engine_fingerprint(OLD) == engine_fingerprint(replace(OLD, replicas=7))
    assert engine_fingerprint(OLD) != engine_fingerprint(NEW)


def test_free_instances_fill_holes_first() -> None:
    assert free_instances("m", {"m:1"}, 2) == ["m", "m:2"]
    assert free_instances("m", set(), 0) == []


def test_nothing_to_do_when_every_replica_runs_the_spec() -> None:
    assert plan_rollout(view(TWO_OLD, [ready("m"), ready("m:1")], model=OLD)) == RolloutPlan()


def test_first_step_places_one_surge_replica_at_a_free_name() -> None:
    plan = plan_rollout(view(TWO_OLD, [ready("m"), ready("m:1")], record=RECORD), T)
    assert plan.extra == 1 and plan.retire == () and plan.rollback is None
    assert plan.status is not None and plan.status.state is RolloutState.ROLLING
    assert (plan.status.surge, plan.status.surge_since, plan.status.since) == ("m:2", 1000.0, 900.0)
    assert plan.status.text() == "rolling 0/2 (waiting for m:2)"


def test_waits_while_the_surge_replica_starts_and_keeps_its_clock() -> None:
    rolling = plan_rollout(view(TWO_OLD, [], record=RECORD), T).status
    ps = [*TWO_OLD, placement("m:2", NEW, port=18002)]
    plan = plan_rollout(view(ps, [ready("m"), ready("m:1"), ready("m:2", phase=Phase.STARTING)], now=1050,
                             record=RECORD, status=rolling), T)
    assert plan.extra == 1 and plan.retire == ()
    assert plan.status is not None and plan.status.surge_since == 1000.0


def test_ready_but_not_settled_is_not_enough() -> None:
    ps = [*TWO_OLD, placement("m:2", NEW, port=18002)]
    plan = plan_rollout(view(ps, [ready("m"), ready("m:1"), ready("m:2", since=998.0)], record=RECORD), T)
    assert plan.extra == 1 and plan.retire == ()


def test_settled_surge_retires_the_lowest_numbered_old_replica() -> None:
    ps = [*TWO_OLD, placement("m:2", NEW, port=18002)]
    plan = plan_rollout(view(ps, [ready("m"), ready("m:1"), ready("m:2", since=990.0)], record=RECORD), T)
    assert plan.retire == ("m",) and plan.extra == 0
    assert plan.status is not None and plan.status.text() == "rolling 1/2"


def test_second_round_then_done_deletes_the_record() -> None:
    ps = [placement("m:1", OLD), placement("m:2", NEW)]
    second = plan_rollout(view(ps, [ready("m:1"), ready("m:2", since=0)], record=RECORD), T)
    assert second.extra == 1 and second.status is not None and second.status.surge == "m"
    done = plan_rollout(view([placement("m", NEW), placement("m:2", NEW)], [ready("m"), ready("m:2")],
                             record=RECORD), T)
    assert done.finish and done.status is not None and done.status.state is RolloutState.DONE
    assert done.status.text() == "done 2/2"


def test_a_failed_surge_rolls_back_to_the_previous_spec_with_today_count() -> None:
    ps = [*TWO_OLD, placement("m:2", NEW)]
    model = replace(NEW, replicas=2)
    plan = plan_rollout(view(ps, [ready("m"), ready("m:1"), ready("m:2", phase=Phase.FAILED,
                                                                   message="unrecognized arguments: --bogus")],
                             record=RECORD, model=model), T)
    assert plan.retire == ("m:2",) and plan.finish and plan.extra == 0
    assert plan.rollback == replace(OLD, replicas=2)
    assert plan.status is not None and plan.status.state is RolloutState.ROLLED_BACK
    assert plan.status.text() == "rolled back: new replica m:2 on n1 failed: unrecognized arguments: --bogus"


def test_a_surge_never_ready_times_out_and_rolls_back() -> None:
    ps = [*TWO_OLD, placement("m:2", NEW)]
    st_ = RolloutStatus(model="m", state=RolloutState.ROLLING, target=engine_fingerprint(NEW), surge="m:2",
                        surge_since=800.0, since=800.0)
    plan = plan_rollout(view(ps, [ready("m:2", phase=Phase.STARTING, message="loading")], record=RECORD,
                             status=st_), T)
    assert plan.rollback is not None and plan.retire == ("m:2",)
    assert plan.status is not None and "not ready after 100 s (starting: loading)" in plan.status.reason


def test_without_a_record_a_failure_fails_and_holds_then_retries() -> None:
    ps = [placement("m", OLD, node="n1"), placement("m:1", OLD, node="n2")]
    drained = frozenset({"n1"})
    up = [ready("m"), ready("m:1")]
    surge = plan_rollout(view(ps, up, model=OLD, drained=drained), T)
    assert surge.extra == 1 and surge.status is not None and surge.status.surge == "m:2"
    failing = [*ps, placement("m:2", OLD, node="n2")]
    failed = plan_rollout(view(failing, [*up, ready("m:2", phase=Phase.FAILED, message="oom")], model=OLD,
                               drained=drained, status=surge.status), T)
    assert failed.retire == ("m:2",) and failed.rollback is None and not failed.finish
    assert failed.status is not None and failed.status.state is RolloutState.FAILED
    held = plan_rollout(view(ps, up, model=OLD, drained=drained, status=failed.status, now=1040), T)
    assert held == RolloutPlan()
    retry = plan_rollout(view(ps, up, model=OLD, drained=drained, status=failed.status, now=1051), T)
    assert retry.extra == 1


def test_a_drained_node_replica_is_replaced_then_retired() -> None:
    ps = [placement("m", OLD, node="n1"), placement("m:1", OLD, node="n2"), placement("m:2", OLD, node="n2")]
    plan = plan_rollout(view(ps, [ready("m"), ready("m:1"), ready("m:2", since=0)], model=OLD,
                             drained=frozenset({"n1"})), T)
    assert plan.retire == ("m",)


def test_mirrors_that_disagree_decide_nothing() -> None:
    other = replace(RECORD, target=replace(NEW, revision="v3"))
    plan = plan_rollout(view(TWO_OLD, [], record=other), T)
    assert plan.extra == 0 and plan.status is None and not plan.finish


def test_after_a_rollback_lagging_mirrors_decide_nothing() -> None:
    # The rollback wrote OLD, deleted RECORD and wrote this status in one transaction; each mirror shows it later.
    back = RolloutStatus(model="m", state=RolloutState.ROLLED_BACK, target=engine_fingerprint(NEW), reason="boom",
                         since=RECORD.started)
    rb = RolledBack(left=engine_fingerprint(NEW), started=RECORD.started)
    up = [ready("m"), ready("m:1")]
    for model, record in ((NEW, RECORD), (NEW, None), (OLD, RECORD)):
        assert not rb.mirrored(model, record)
        plan = plan_rollout(replace(view(TWO_OLD, up, model=model, record=record, status=back), rolled_back=rb), T)
        assert plan.extra == 0 and plan.status is None and plan.rollback is None and not plan.finish, (model, record)
    # Without the guard, the models mirror still showing NEW starts the failed update again, with no record:
    again = plan_rollout(view(TWO_OLD, up, model=NEW, status=back), T)
    assert again.extra == 1 and again.status is not None and again.status.reason == ""
    assert rb.mirrored(OLD, None), "both mirrors caught up"
    assert rb.mirrored(NEW, replace(RECORD, started=950.0)), "an admin's later update of the same spec"
    assert plan_rollout(replace(view(TWO_OLD, up, model=OLD, status=back), rolled_back=rb), T) == RolloutPlan()


def test_a_replica_place_adds_for_a_lost_one_is_waited_for_not_judged() -> None:
    ps = [placement("m", OLD), placement("m:1", NEW)]
    plan = plan_rollout(view(ps, [ready("m:1", phase=Phase.FAILED)], record=RECORD), T)
    assert plan.extra == 0 and plan.retire == () and plan.rollback is None


def test_a_rollback_that_had_replaced_some_rolls_those_back_and_ends_rolled_back() -> None:
    back = RolloutStatus(model="m", state=RolloutState.ROLLED_BACK, target=engine_fingerprint(NEW), reason="boom")
    ps = [placement("m", NEW), placement("m:1", OLD)]
    rolling = plan_rollout(view(ps, [ready("m", since=0), ready("m:1", since=0)], model=OLD, status=back), T)
    assert rolling.extra == 1 and rolling.status is not None
    assert rolling.status.text() == "rolling 1/2 (waiting for m:2); rolling back: boom"
    end = plan_rollout(view([placement("m:1", OLD), placement("m:2", OLD)], [ready("m:1"), ready("m:2")],
                            model=OLD, status=rolling.status), T)
    assert end.status is not None and end.status.state is RolloutState.ROLLED_BACK and end.status.reason == "boom"


# --- the whole rollout, simulated: place() and plan_rollout() pass after pass ---------------------------------

@settings(max_examples=120, deadline=None)
@given(replicas=st.integers(1, 4), start_passes=st.integers(1, 6), fails=st.booleans(),
       drain=st.booleans())
def test_simulated_rollout_keeps_capacity_and_ends(replicas: int, start_passes: int, fails: bool,
                                                   drain: bool) -> None:
    nodes = {n: NodeRecord(name=n, address="10.0.0.1", port_min=18000, port_max=18020) for n in ("n1", "n2")}
    old = replace(OLD, replicas=replicas)
    new = old if drain else replace(NEW, replicas=replicas)
    model = new
    drained = frozenset({"n1"}) if drain else frozenset()
    placements = place({"m": old}, {"n1": nodes["n1"]}, {}).placements
    instances = {i: ready(i) for i in placements}
    born: dict[str, int] = {}
    record = None if drain else RolloutRecord(model="m", previous=old, target=new, started=0.0)
    status: RolloutStatus | None = None
    now = 100.0
    for step in range(200):
        now += 10.0
        plan = plan_rollout(RolloutView(model=model, placements=placements, instances=instances, now=now,
                                        record=record, status=status, drained=drained), T)
        if plan.status is not None:
            status = plan.status
        if plan.rollback is not None:
            model = plan.rollback
        if plan.finish:
            record = None
        current = {i: p for i, p in placements.items() if i not in plan.retire}
        placements = dict(place({"m": model}, nodes, current, surge={"m": plan.extra}, drained=drained,
                                taken=set(instances) - set(plan.retire)).placements)
        for inst in set(instances) - set(placements):
            del instances[inst]
        for inst, p in placements.items():
            born.setdefault(inst, step)
            broken = fails and (p.node == "n2" if drain else not same_engine(p.model, old))
            phase = Phase.FAILED if broken else Phase.READY
            if step - born[inst] >= start_passes and (inst not in instances or instances[inst].phase is not phase):
                instances[inst] = ready(inst, since=now, phase=phase)
        # In service: READY instances. Never below the count, whatever happens, and never above count + 1.
        serving = sum(1 for s in instances.values() if s.phase is Phase.READY)
        assert serving >= replicas, f"step {step}: {serving} serving of {replicas}"
        assert len(placements) <= replicas + 1
        if status is not None and status.finished and record is None:
            break
    else:
        raise AssertionError(f"the rollout never ended: {status}")
    assert status is not None
    if fails:
        assert status.state is (RolloutState.FAILED if drain else RolloutState.ROLLED_BACK)
        assert all(same_engine(p.model, old) for p in placements.values())
    else:
        assert status.state is RolloutState.DONE
        assert all(same_engine(p.model, new) and p.node not in drained for p in placements.values())
        assert len(placements) == replicas


def test_an_old_rollback_reason_does_not_leak_into_a_later_update_or_drain() -> None:
    old = RolloutStatus(model="m", state=RolloutState.ROLLED_BACK, target=engine_fingerprint(
        replace(OLD, revision="bad")), reason="long ago")
    update = plan_rollout(view(TWO_OLD, [ready("m"), ready("m:1")], record=RECORD, status=old), T)
    assert update.status is not None and update.status.reason == ""
    drain = plan_rollout(view(TWO_OLD, [ready("m"), ready("m:1")], model=OLD, status=old,
                              drained=frozenset({"n1"})), T)
    assert drain.status is not None and drain.status.reason == ""
    done = plan_rollout(view([placement("m", NEW), placement("m:1", NEW)], [ready("m"), ready("m:1")],
                             record=RECORD, status=update.status), T)
    assert done.status is not None and done.status.state is RolloutState.DONE
