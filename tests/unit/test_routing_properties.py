"""Properties of the routing policy (pure), over replica sets, loads and policies Hypothesis draws: the pick
is always an allowed, least-loaded or home replica, never one that is not ready; affinity is stable; rendezvous
moves only the keys of a replica that came or went (examples: test_routing_pick.py)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from nebula.core.engine_load import EngineLoad
from nebula.core.model import Phase
from nebula.core.routing import (
    LoadPolicy,
    Replica,
    kv_cache_hot,
    load_score,
    pick_replica,
    ready_replicas,
    rendezvous_home,
)
from tests.unit.routing_fixtures import NO_LOADS, rep, status

# --- properties ------------------------------------------------------------------------------------------

replica_sets = st.lists(st.integers(min_value=1, max_value=40), min_size=0, max_size=8, unique=True).map(
    lambda ports: [rep(p) for p in ports])
engine_loads = st.builds(EngineLoad, waiting=st.integers(0, 20).map(float), running=st.integers(0, 20).map(float),
                         kv_cache_usage=st.floats(0.0, 1.0))
policies = st.builds(LoadPolicy, waiting_weight=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
                     kv_cache_threshold=st.sampled_from([0.5, 0.9, 1.0]),
                     kv_cache_penalty=st.sampled_from([0.0, 4.0, 8.0]), affinity_slack=st.sampled_from([0.0, 1.0, 4.0]))
keys_ = st.one_of(st.none(), st.text(min_size=1, max_size=16))


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[Replica], dict[str, int], dict[str, EngineLoad], set[str]]:
    reps = draw(replica_sets)
    inflight = {r.endpoint: draw(st.integers(min_value=0, max_value=5)) for r in reps}
    loads = {r.endpoint: draw(engine_loads) for r in reps if draw(st.booleans())}
    exclude = {r.endpoint for r in reps if draw(st.booleans())}
    return reps, inflight, loads, exclude


@given(situations(), st.integers(min_value=0, max_value=1000), keys_, policies)
def test_pick_properties(sit: tuple[list[Replica], dict[str, int], dict[str, EngineLoad], set[str]], turn: int,
                         key: str | None, policy: LoadPolicy) -> None:
    reps, inflight, loads, exclude = sit
    picked = pick_replica(reps, inflight, loads, exclude, turn, key, policy)
    allowed = [r for r in reps if r.endpoint not in exclude]
    if not allowed:
        assert picked is None
        return
    assert picked in allowed
    scores = {r.endpoint: load_score(inflight[r.endpoint], loads.get(r.endpoint), policy) for r in allowed}
    best = min(scores.values())
    home = rendezvous_home(allowed, key) if key is not None else None
    if picked != home:
        assert scores[picked.endpoint] == best  # not the home: always a least-loaded one
    else:
        # The home wins only while it is not overloaded (or when it is a least-loaded one anyway).
        assert scores[picked.endpoint] <= best + policy.affinity_slack
        assert not kv_cache_hot(loads.get(picked.endpoint), policy) or scores[picked.endpoint] == best
    # Deterministic: the same inputs give the same answer.
    assert pick_replica(reps, inflight, loads, exclude, turn, key, policy) == picked


@given(st.lists(st.tuples(st.integers(1, 30), st.sampled_from(list(Phase))), max_size=10), situations(),
       st.integers(0, 100), keys_, policies)
def test_never_a_replica_that_is_not_ready(
        instances: list[tuple[int, Phase]],
        sit: tuple[list[Replica], dict[str, int], dict[str, EngineLoad], set[str]],
        turn: int, key: str | None, policy: LoadPolicy) -> None:
    statuses = [status(f"m:{i}", phase, port=port) for i, (port, phase) in enumerate(instances)]
    ready_endpoints = {s.endpoint for s in statuses if s.phase is Phase.READY}
    _, inflight, loads, exclude = sit
    candidates = ready_replicas(statuses).get("m", ())
    # Loads and in-flight counts of non-ready endpoints (draining, stale samples) must not matter.
    all_loads = {**{f"http://127.0.0.1:{p}": EngineLoad() for p, _ in instances}, **loads}
    picked = pick_replica(candidates, inflight, all_loads, exclude, turn, key, policy)
    assert picked is None or picked.endpoint in ready_endpoints
    assert (picked is None) == (not (ready_endpoints - exclude))


@given(situations(), st.text(min_size=1, max_size=16), policies, st.integers(0, 1000), st.integers(0, 1000))
def test_affinity_is_stable_across_calls(
        sit: tuple[list[Replica], dict[str, int], dict[str, EngineLoad], set[str]], key: str,
        policy: LoadPolicy, turn1: int, turn2: int) -> None:
    reps, inflight, loads, exclude = sit
    home = rendezvous_home([r for r in reps if r.endpoint not in exclude], key)
    first = pick_replica(reps, inflight, loads, exclude, turn1, key, policy)
    # A hot home loses affinity and may still come first by its turn among equals: that pick may move.
    if first == home and home is not None and not kv_cache_hot(loads.get(home.endpoint), policy):
        # The turn counter moves between calls; an affinity pick does not move with it.
        assert pick_replica(reps, inflight, loads, exclude, turn2, key, policy) == home


@given(replica_sets.filter(bool), st.text(min_size=1, max_size=16), policies, st.integers(0, 1000),
       st.integers(0, 5), st.integers(0, 5))
def test_affinity_holds_under_equal_load_and_yields_to_overload(
        reps: list[Replica], key: str, policy: LoadPolicy, turn: int, base: int, extra: int) -> None:
    home = rendezvous_home(reps, key)
    assert home is not None
    inflight = {r.endpoint: base for r in reps}
    assert pick_replica(reps, inflight, NO_LOADS, (), turn, key, policy) == home
    inflight[home.endpoint] = base + int(policy.affinity_slack) + 1 + extra
    picked = pick_replica(reps, inflight, NO_LOADS, (), turn, key, policy)
    assert picked != home or len(reps) == 1
    # A full KV cache: the home loses affinity, and (with a penalty) the least-loaded choice too.
    hot = {home.endpoint: EngineLoad(kv_cache_usage=1.0)}
    penalised = dataclasses.replace(policy, kv_cache_penalty=max(policy.kv_cache_penalty, 1.0))
    picked = pick_replica(reps, {}, hot, (), turn, key, penalised)
    assert picked != home or len(reps) == 1


@given(replica_sets.filter(bool), st.integers(41, 60), st.lists(st.text(max_size=12), min_size=1, max_size=30))
def test_rendezvous_moves_only_the_keys_of_the_replica_that_came_or_went(
        reps: list[Replica], new_port: int, keys: list[str]) -> None:
    new = rep(new_port)
    for key in keys:
        before = rendezvous_home(reps, key)
        after_add = rendezvous_home([*reps, new], key)
        assert after_add in (before, new)  # a key moves only to the newcomer
        gone = reps[0]
        after_remove = rendezvous_home(reps[1:], key)
        if before != gone:
            assert after_remove == before  # keys of the others stay put
        # Order of the candidates does not matter.
        assert rendezvous_home(list(reversed(reps)), key) == before


@given(replica_sets.filter(bool), st.integers(min_value=0, max_value=1000))
def test_equal_load_spreads_evenly_over_a_full_cycle(reps: list[Replica], start: int) -> None:
    picks = Counter(pick_replica(reps, {}, NO_LOADS, (), start + i) for i in range(len(reps) * 3))
    assert picks == Counter({r: 3 for r in reps})
