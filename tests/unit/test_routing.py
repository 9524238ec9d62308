"""The routing policy (pure) and the router's replica table."""

from __future__ import annotations

import asyncio
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from nebula.adapters.store import KeyValue
from nebula.core import keys
from nebula.core.model import InstanceStatus, Phase, Task, dumps
from nebula.core.routing import Replica, phase_counts, pick_least_outstanding, ready_replicas
from nebula.services.router.table import ReplicaTable


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


# --- pick_least_outstanding ------------------------------------------------------------------------------

def test_pick_prefers_least_outstanding() -> None:
    a, b, c = rep(1), rep(2), rep(3)
    load = {a.endpoint: 3, b.endpoint: 1, c.endpoint: 2}
    assert pick_least_outstanding([a, b, c], load, (), 0) == b
    assert pick_least_outstanding([a, b, c], load, {b.endpoint}, 0) == c


def test_pick_none_when_empty_or_all_excluded() -> None:
    a = rep(1)
    assert pick_least_outstanding([], {}, (), 0) is None
    assert pick_least_outstanding([a], {}, {a.endpoint}, 5) is None


def test_pick_round_robins_among_ties() -> None:
    reps = [rep(1), rep(2), rep(3)]
    picks = [pick_least_outstanding(reps, {}, (), turn) for turn in range(6)]
    assert picks == reps + reps


replica_sets = st.lists(st.integers(min_value=1, max_value=40), min_size=0, max_size=8, unique=True).map(
    lambda ports: [rep(p) for p in ports])


@given(replica_sets, st.data(), st.integers(min_value=0, max_value=1000))
def test_pick_properties(reps: list[Replica], data: st.DataObject, turn: int) -> None:
    load = {r.endpoint: data.draw(st.integers(min_value=0, max_value=5)) for r in reps}
    exclude = {r.endpoint for r in reps if data.draw(st.booleans())}
    picked = pick_least_outstanding(reps, load, exclude, turn)
    allowed = [r for r in reps if r.endpoint not in exclude]
    if not allowed:
        assert picked is None
        return
    assert picked in allowed
    assert load[picked.endpoint] == min(load[r.endpoint] for r in allowed)
    # Deterministic: the same inputs give the same answer.
    assert pick_least_outstanding(reps, load, exclude, turn) == picked


@given(replica_sets.filter(bool), st.integers(min_value=0, max_value=1000))
def test_equal_load_spreads_evenly_over_a_full_cycle(reps: list[Replica], start: int) -> None:
    picks = Counter(pick_least_outstanding(reps, {}, (), start + i) for i in range(len(reps) * 3))
    assert picks == Counter({r: 3 for r in reps})


# --- ReplicaTable ----------------------------------------------------------------------------------------

def kvs(*statuses: InstanceStatus, extra: dict[str, bytes] | None = None) -> dict[str, KeyValue]:
    out = {keys.instance_key(s.instance): KeyValue(keys.instance_key(s.instance), dumps(s.to_dict()), 5, 1)
           for s in statuses}
    for k, v in (extra or {}).items():
        out[k] = KeyValue(k, v, 6, 1)
    return out


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
    view = table.to_json()
    assert view["models"]["m"]["phases"] == {"draining": 1, "ready": 1}


async def test_wait_for_replica_wakes_on_update() -> None:
    table = ReplicaTable()
    table.update({})
    waiter = asyncio.create_task(table.wait_for_replica("m", 5.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    table.update(kvs(status("m", Phase.STARTING)))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    table.update(kvs(status("m")))
    assert await asyncio.wait_for(waiter, 1.0)
    assert not await table.wait_for_replica("absent", 0.01)
