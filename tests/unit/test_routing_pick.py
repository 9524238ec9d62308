"""The routing policy (pure): the ready replicas, and the pick among them, least loaded and with prefix
affinity (the same as properties: test_routing_properties.py; the prefix key: test_routing_prefix_key.py; the
gateway's replica table: test_replica_table.py)."""

from __future__ import annotations

from collections import Counter

from nebula.core.engine_load import EngineLoad
from nebula.core.model import InstanceStatus, Phase, Task
from nebula.core.routing import (
    LoadPolicy,
    Replica,
    load_score,
    phase_counts,
    pick_replica,
    ready_replicas,
    rendezvous_home,
)
from tests.unit.routing_fixtures import NO_LOADS, rep, status

# --- ready_replicas ---------------------------------------------------------------------------------------

def test_ready_replicas_keeps_only_ready_with_endpoint_sorted_per_model() -> None:
    statuses = [
        status("m:2", port=9002), status("m", port=9000), status("m:1", Phase.STARTING, port=9001),
        status("e", model="e", port=9100, task=Task.EMBED), status("m:3", Phase.DRAINING, port=9003),
        InstanceStatus(instance="m:4", model="m", node="n1", phase=Phase.READY, endpoint=""),
    ]
    table = ready_replicas(statuses)
    assert [r.instance for r in table["m"]] == ["m", "m:2"]
    assert table["e"][0].task is Task.EMBED
    assert set(table) == {"m", "e"}


def test_ready_replicas_counts_a_shared_endpoint_once_and_strips_slash() -> None:
    stale = InstanceStatus(instance="m:9", model="m", node="n1", phase=Phase.READY,
                           endpoint="http://127.0.0.1:9000/")
    table = ready_replicas([stale, status("m", port=9000)])
    assert table["m"] == (Replica("m", "m", "http://127.0.0.1:9000", Task.GENERATE),)


def test_phase_counts() -> None:
    counts = phase_counts([status("a"), status("b", Phase.FAILED), status("c"), status("x", model="o")])
    assert counts["m"] == Counter({Phase.READY: 2, Phase.FAILED: 1})
    assert counts["o"] == Counter({Phase.READY: 1})


# --- pick_replica: least loaded --------------------------------------------------------------------------

POLICY = LoadPolicy(waiting_weight=2.0, kv_cache_threshold=0.9, kv_cache_penalty=8.0, affinity_slack=4.0)


def test_pick_prefers_least_outstanding() -> None:
    a, b, c = rep(1), rep(2), rep(3)
    load = {a.endpoint: 3, b.endpoint: 1, c.endpoint: 2}
    assert pick_replica([a, b, c], load, NO_LOADS, (), 0) == b
    assert pick_replica([a, b, c], load, NO_LOADS, {b.endpoint}, 0) == c


def test_pick_none_when_empty_or_all_excluded() -> None:
    a = rep(1)
    assert pick_replica([], {}, NO_LOADS, (), 0) is None
    assert pick_replica([a], {}, NO_LOADS, {a.endpoint}, 5) is None
    assert pick_replica([a], {}, NO_LOADS, {a.endpoint}, 5, prefix="k") is None


def test_pick_round_robins_among_ties() -> None:
    reps = [rep(1), rep(2), rep(3)]
    picks = [pick_replica(reps, {}, NO_LOADS, (), turn) for turn in range(6)]
    assert picks == reps + reps


def test_score_adds_weighted_waiting_and_the_kv_penalty() -> None:
    assert load_score(3, None, POLICY) == 3.0
    assert load_score(3, EngineLoad(waiting=2, running=9, kv_cache_usage=0.5), POLICY) == 7.0
    assert load_score(0, EngineLoad(waiting=0, running=0, kv_cache_usage=0.9), POLICY) == 8.0


def test_engine_queue_outweighs_own_inflight() -> None:
    a, b = rep(1), rep(2)
    # a: idle here but 5 queued in its engine (other gateways' traffic); b: 3 of ours in flight.
    loads = {a.endpoint: EngineLoad(waiting=5)}
    assert pick_replica([a, b], {b.endpoint: 3}, loads, (), 0, policy=POLICY) == b
    # A replica whose load is unknown (poll failed) is judged on in-flight requests alone.
    assert pick_replica([a, b], {b.endpoint: 3}, {}, (), 0, policy=POLICY) == a


def test_hot_kv_cache_is_avoided() -> None:
    a, b = rep(1), rep(2)
    loads = {a.endpoint: EngineLoad(kv_cache_usage=0.95), b.endpoint: EngineLoad(kv_cache_usage=0.2)}
    assert pick_replica([a, b], {b.endpoint: 5}, loads, (), 0, policy=POLICY) == b


# --- pick_replica: prefix affinity ------------------------------------------------------------------------

def test_affinity_sticks_to_the_home_while_it_is_within_the_slack() -> None:
    reps = [rep(p) for p in range(1, 5)]
    home = rendezvous_home(reps, "conv-1")
    assert home is not None
    inflight = {home.endpoint: 4}  # 4 above the others: exactly the slack
    assert {pick_replica(reps, inflight, NO_LOADS, (), t, "conv-1", POLICY) for t in range(8)} == {home}
    inflight = {home.endpoint: 5}
    assert home not in {pick_replica(reps, inflight, NO_LOADS, (), t, "conv-1", POLICY) for t in range(8)}


def test_affinity_yields_to_a_hot_kv_cache_and_to_exclusion() -> None:
    reps = [rep(1), rep(2), rep(3)]
    home = rendezvous_home(reps, "k")
    assert home is not None
    hot = {home.endpoint: EngineLoad(kv_cache_usage=0.9)}
    assert pick_replica(reps, {}, hot, (), 0, "k", POLICY) != home
    # A retry (home already tried) goes to the least loaded of the rest.
    assert pick_replica(reps, {}, NO_LOADS, {home.endpoint}, 0, "k", POLICY) not in (None, home)


def test_different_keys_spread_over_replicas() -> None:
    reps = [rep(p) for p in range(1, 5)]
    homes = Counter(rendezvous_home(reps, f"conv-{i}") for i in range(400))
    assert set(homes) == set(reps)
    assert min(homes.values()) > 60  # 100 each on average
