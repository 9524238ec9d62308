"""The routing policy (pure: least loaded, prefix affinity, the prefix key) and the gateway's replica table."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core import keys, records
from nebula.core.engine_load import EngineLoad
from nebula.core.model import InstanceStatus, Phase, Task, dumps
from nebula.core.routing import (
    PREFIX_CHARS,
    LoadPolicy,
    Replica,
    kv_cache_hot,
    load_score,
    phase_counts,
    pick_replica,
    prefix_key,
    ready_replicas,
    rendezvous_home,
)
from nebula.core.store import KeyValue
from nebula.services.cluster.mirror import MirrorState
from nebula.services.gateway.load import LoadBook
from nebula.services.gateway.replicas import ReplicaTable
from tests.harness.mirrors import mirrored


def status(instance: str, phase: Phase = Phase.READY, model: str = "m", port: int = 9000,
           task: Task = Task.GENERATE) -> InstanceStatus:
    return InstanceStatus(instance=instance, model=model, node="n1", phase=phase,
                          endpoint=f"http://127.0.0.1:{port}", task=task)


def rep(port: int, model: str = "m") -> Replica:
    return Replica(instance=f"{model}:{port}", model=model, endpoint=f"http://127.0.0.1:{port}",
                   task=Task.GENERATE)


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

NO_LOADS: dict[str, EngineLoad] = {}
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


# --- prefix_key ------------------------------------------------------------------------------------------

def chat(*messages: tuple[str, object], model: str = "m") -> dict[str, object]:
    return {"model": model, "messages": [{"role": r, "content": c} for r, c in messages]}


def test_prefix_key_is_short_hex_and_follows_the_conversation() -> None:
    first = chat(("system", "You are terse."), ("user", "Plan a trip"))
    key = prefix_key(first)
    assert key is not None and len(key) == 16 and int(key, 16) >= 0
    later = chat(("system", "You are terse."), ("user", "Plan a trip"), ("assistant", "Where?"),
                 ("user", "Rome"))
    assert prefix_key({**later, "temperature": 0.2, "stream": True}) == key
    assert prefix_key(chat(("system", "You are terse."), ("user", "Plan a party"))) != key
    assert prefix_key(chat(("system", "You are kind."), ("user", "Plan a trip"))) != key
    assert prefix_key(chat(("system", "You are terse."), ("user", "Plan a trip"), model="other")) != key


def test_prefix_key_reads_content_parts_and_developer_role() -> None:
    parts = [{"type": "text", "text": "Plan "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "a trip"}]
    assert prefix_key(chat(("developer", "You are terse."), ("user", parts))) == prefix_key(
        chat(("system", "You are terse."), ("user", "Plan a trip")))


def test_prefix_key_of_anthropic_messages_reads_the_top_level_system_prompt() -> None:
    openai_style = prefix_key(chat(("system", "You are terse."), ("user", "Plan a trip")))
    blocks = [{"type": "text", "text": "You are terse."}]
    for system in ("You are terse.", blocks):
        body = {**chat(("user", [{"type": "text", "text": "Plan a trip"}])), "system": system, "max_tokens": 8}
        assert prefix_key(body) == openai_style
    other = {**chat(("user", "Plan a trip")), "system": "You are kind."}
    assert prefix_key(other) != openai_style


def test_prefix_key_of_a_responses_request_reads_instructions_and_input() -> None:
    openai_style = prefix_key(chat(("system", "You are terse."), ("user", "Plan a trip")))
    assert prefix_key({"model": "m", "instructions": "You are terse.", "input": "Plan a trip"}) == openai_style
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Plan a trip"}]}]
    assert prefix_key({"model": "m", "instructions": "You are terse.", "input": items}) == openai_style
    assert prefix_key({"model": "m", "input": 3}) is None


def test_prefix_key_looks_at_a_bounded_prefix() -> None:
    head = "x" * PREFIX_CHARS
    assert prefix_key(chat(("user", head + "A"))) == prefix_key(chat(("user", head + "B")))
    assert prefix_key(chat(("user", head[1:] + "A"))) != prefix_key(chat(("user", head[1:] + "B")))


def test_prefix_key_of_completions() -> None:
    key = prefix_key({"model": "m", "prompt": "Once upon a time"})
    assert key is not None
    assert prefix_key({"model": "m", "prompt": ["Once upon a time", "other"]}) == key
    assert prefix_key({"model": "m", "prompt": "Once upon a tide"}) != key
    assert prefix_key({"model": "m", "prompt": [1, 2, 3]}) == prefix_key({"model": "m", "prompt": [[1, 2, 3]]})
    assert prefix_key({"model": "m", "prompt": [1, 2, 3]}) != prefix_key({"model": "m", "prompt": [1, 2, 4]})


@pytest.mark.parametrize("body", [
    {"model": "m", "input": ""},
    {"model": "m", "query": "q", "documents": ["a", "b"]},
    {"model": "m", "text_1": "a", "text_2": "b"},
    {"model": "m", "messages": []},
    {"model": "m", "prompt": ""},
    {"messages": [{"role": "user", "content": "hi"}]},
])
def test_prefix_key_is_none_without_a_text_prefix(body: dict[str, object]) -> None:
    assert prefix_key(body) is None


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                     max_size=4),
                           max_leaves=20)


@given(st.dictionaries(st.sampled_from(["model", "messages", "prompt", "input", "x"]), json_values))
def test_prefix_key_never_raises(body: dict[str, object]) -> None:
    key = prefix_key(body)
    assert key is None or len(key) == 16


# --- ReplicaTable ----------------------------------------------------------------------------------------

def kvs(*statuses: InstanceStatus, extra: dict[str, bytes] | None = None) -> MirrorState[InstanceStatus]:
    out = {keys.instance_key(s.instance): KeyValue(keys.instance_key(s.instance), dumps(s.to_dict()), 5, 1)
           for s in statuses}
    for k, v in (extra or {}).items():
        out[k] = KeyValue(k, v, 6, 1)
    return mirrored(records.INSTANCES, out)


def test_table_skips_invalid_records_and_routes_the_rest() -> None:
    table = ReplicaTable()
    table.update(kvs(status("m", port=9000), extra={keys.instance_key("bad"): b"{not json",
                                                    keys.instance_key("bad2"): b'{"phase": "nope"}'}))
    assert table.synced
    picked = table.pick("m")
    assert picked is not None and picked.endpoint == "http://127.0.0.1:9000"
    assert table.pick("other") is None


def test_table_tracks_inflight_and_prefers_idle_replica() -> None:
    table = ReplicaTable()
    table.update(kvs(status("m", port=9000), status("m:1", port=9001)))
    first = table.pick("m")
    assert first is not None
    with table.track(first):
        assert table.inflight(first.endpoint) == 1
        for _ in range(3):
            other = table.pick("m")
            assert other is not None and other.endpoint != first.endpoint
    assert table.inflight(first.endpoint) == 0


def test_replica_leaving_ready_gets_no_new_requests_but_keeps_its_count() -> None:
    table = ReplicaTable()
    a, b = status("m", port=9000), status("m:1", port=9001)
    table.update(kvs(a, b))
    replica_a = next(r for r in table.ready()["m"] if r.instance == "m")
    with table.track(replica_a):
        table.update(kvs(InstanceStatus(**{**a.__dict__, "phase": Phase.DRAINING}), b))
        assert {table.pick("m").endpoint for _ in range(4)} == {"http://127.0.0.1:9001"}  # type: ignore[union-attr]
        assert table.draining_inflight() == {"http://127.0.0.1:9000": 1}
    assert table.draining_inflight() == {}
    view = table.to_json(0.0)
    assert view["models"]["m"]["phases"] == {"draining": 1, "ready": 1}


async def test_wait_for_replica_wakes_on_update() -> None:
    table = ReplicaTable()
    table.update(mirrored(records.INSTANCES))
    waiter = asyncio.create_task(table.wait_for_replica("m", 5.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    table.update(kvs(status("m", Phase.STARTING)))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    table.update(kvs(status("m")))
    assert await asyncio.wait_for(waiter, 1.0)
    assert not await table.wait_for_replica("absent", 0.01)


def test_table_routes_on_polled_load_and_prefix() -> None:
    book = LoadBook(max_age_s=3.0)
    table = ReplicaTable(LoadPolicy(), book)
    table.update(kvs(status("m", port=9000), status("m:1", port=9001)))
    book.record("http://127.0.0.1:9000", EngineLoad(waiting=10), now=1.0)
    assert {table.pick("m").endpoint for _ in range(4)} == {"http://127.0.0.1:9001"}  # type: ignore[union-attr]
    homes = {table.pick("m", prefix=lambda: "conv").endpoint for _ in range(4)}  # type: ignore[union-attr]
    assert len(homes) == 1
    ready = table.to_json(2.5)["models"]["m"]["ready"]
    assert [r["load"] for r in ready] == [{"waiting": 10.0, "running": 0.0, "kv_cache_usage": 0.0, "age_s": 1.5},
                                          None]
    assert table.ready_endpoints() == {"http://127.0.0.1:9000", "http://127.0.0.1:9001"}
