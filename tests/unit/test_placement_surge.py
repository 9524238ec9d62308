"""place() with a rolling replace's surge, drained nodes and sparse instance names (core/rollout.py drives it)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nebula.core.model import ModelSpec, NodeRecord, Placement
from nebula.core.placement import diff_placements, place


def node(name: str) -> NodeRecord:
    return NodeRecord(name=name, address="10.0.0.1", port_min=18000, port_max=18009)


def model(name: str, replicas: int = 1, **kw: object) -> ModelSpec:
    return ModelSpec.from_dict({"name": name, "source": "/m", "replicas": replicas, **kw})


def test_a_surge_adds_one_replica_at_the_lowest_free_name_with_the_new_spec() -> None:
    nodes = {"n1": node("n1"), "n2": node("n2")}
    old = place({"a": model("a", 2)}, nodes, {}).placements
    new = model("a", 2, revision="v2")
    r = place({"a": new}, nodes, old, surge={"a": 1}).placements
    assert set(r) == {"a", "a:1", "a:2"}
    assert r["a"] == old["a"] and r["a:1"] == old["a:1"], "the old replicas keep their spec and slot"
    assert r["a:2"].model.revision == "v2"
    assert diff_placements(old, r) == ([r["a:2"]], [])


def test_a_surge_goes_where_the_outdated_replicas_are_so_the_spread_survives_the_rollout() -> None:
    nodes = {"n1": node("n1"), "n2": node("n2")}
    old = place({"a": model("a", 2)}, nodes, {}).placements
    new = model("a", 2, revision="v2")
    first = place({"a": new}, nodes, old, surge={"a": 1}).placements
    retired = {i: p for i, p in first.items() if i != "a"}  # "a" (n1) retired once its successor was ready
    second = place({"a": new}, nodes, retired, surge={"a": 1}).placements
    surge = next(p for i, p in second.items() if i not in retired)
    assert surge.node != first["a:2"].node, "the second new replica goes beside the remaining old one"


def test_sparse_names_are_kept_and_holes_are_filled_first() -> None:
    nodes = {"n1": node("n1")}
    m = model("a", 2)
    start = place({"a": model("a", 3)}, nodes, {}).placements
    sparse = {i: p for i, p in start.items() if i != "a"}  # "a" retired by a rollout
    assert place({"a": m}, nodes, sparse).placements == sparse
    up = place({"a": model("a", 3)}, nodes, sparse).placements
    assert set(up) == {"a", "a:1", "a:2"}


def test_a_name_still_reported_elsewhere_is_not_reused() -> None:
    nodes = {"n1": node("n1")}
    r = place({"a": model("a", 1)}, nodes, {}, taken={"a"}).placements
    assert set(r) == {"a:1"}


def test_beyond_the_count_outdated_replicas_go_first_then_the_highest_numbered() -> None:
    nodes = {"n1": node("n1")}
    three = place({"a": model("a", 3)}, nodes, {}).placements
    new = model("a", 2, revision="v2")
    mixed = dict(three) | {"a:2": Placement(instance="a:2", node="n1", model=model("a", revision="v2"),
                                            port=three["a:2"].port)}
    kept = place({"a": new}, nodes, mixed).placements
    assert set(kept) == {"a", "a:2"}, "the fresh one stays, and of the outdated ones the lowest-numbered"
    down = place({"a": model("a", 2)}, nodes, three).placements
    assert set(down) == {"a", "a:1"}


def test_ports_of_engines_still_draining_are_not_handed_out() -> None:
    r = place({"a": model("a", 1)}, {"n1": node("n1")}, {}, held_ports={"n1": {18000, 18001}, "gone": {1}})
    assert r.placements["a"].port == 18002


def test_nothing_new_goes_to_a_drained_node_and_its_replicas_stay_until_moved() -> None:
    nodes = {"n1": node("n1"), "n2": node("n2")}
    first = place({"a": model("a", 1)}, {"n1": node("n1")}, {}).placements
    kept = place({"a": model("a", 1)}, nodes, first, drained={"n1"}).placements
    assert kept == first
    surged = place({"a": model("a", 1)}, nodes, first, drained={"n1"}, surge={"a": 1}).placements
    assert surged["a:1"].node == "n2"


def test_every_node_drained_is_pending_with_the_reason() -> None:
    r = place({"a": model("a")}, {"n1": node("n1")}, {}, drained={"n1"})
    assert r.placements == {}
    assert r.pending == {"a": "every live node is drained (nebula node undrain NODE)"}


@settings(max_examples=150, deadline=None)
@given(replicas=st.integers(1, 5), surge=st.integers(0, 1), drop=st.sets(st.integers(0, 5)),
       drained=st.sets(st.sampled_from(["n1", "n2", "n3"]), max_size=2))
def test_properties(replicas: int, surge: int, drop: set[int], drained: set[str]) -> None:
    nodes = {n: node(n) for n in ("n1", "n2", "n3")}
    start = place({"a": model("a", 6)}, nodes, {}).placements
    current = {i: p for i, p in start.items() if int(i.partition(":")[2] or 0) not in drop}
    r = place({"a": model("a", replicas)}, nodes, current, surge={"a": surge}, drained=drained)
    assert len(r.placements) == replicas + surge
    for inst, p in r.placements.items():
        assert p.instance == inst
        assert inst in current or p.node not in drained, "a new replica on a drained node"
        assert inst not in current or p == current[inst], "a kept replica moved or changed"
    assert place({"a": model("a", replicas)}, nodes, r.placements, surge={"a": surge},
                 drained=drained).placements == r.placements
