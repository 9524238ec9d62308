"""place() on what the GPUs really have: memory used outside Nebula, a reserve, GPUs of different sizes on
one node and across nodes, and adjacent GPUs for a tensor-parallel replica."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.core.model import Gpu, ModelSpec, NodeRecord
from nebula.core.placement import gpu_capacity_mib, place

GIB = 1024


def node(name: str, *gpus: Gpu) -> NodeRecord:
    return NodeRecord(name=name, address="10.0.0.1", port_min=18000, port_max=18063, gpus=gpus)


def gpu(index: int, total_gib: int, outside_gib: float = 0, group: int = 0) -> Gpu:
    return Gpu(index, "GPU", total_gib * GIB, int(outside_gib * GIB), memory_outside_mib=int(outside_gib * GIB),
               link_group=group)


def model(name: str, replicas: int = 1, gpus: int = 1, mem_gib: float = 0) -> ModelSpec:
    return ModelSpec.from_dict({"name": name, "source": "/m", "replicas": replicas, "gpus_per_replica": gpus,
                                "gpu_memory_mib": int(mem_gib * GIB)})


def test_capacity_is_total_less_reserve_less_outside_use() -> None:
    assert gpu_capacity_mib(gpu(0, 80, outside_gib=70), 1024) == 9 * GIB
    assert gpu_capacity_mib(gpu(0, 80, outside_gib=80), 1024) == 0  # never negative


def test_memory_used_outside_nebula_is_not_placed_on_and_the_reason_says_so() -> None:
    nodes = {"node-a": node("node-a", gpu(0, 24)), "node-b": node("node-b", gpu(0, 80, 5), gpu(1, 80, 70))}
    r = place({"big": model("big", replicas=2, mem_gib=40)}, nodes, {})
    assert [(p.node, p.gpu_indices) for p in r.placements.values()] == [("node-b", (0,))]
    assert r.pending == {"big": "1 of 2 replicas placed; the others: needs 40 GiB on one GPU; largest free is "
                                "35 GiB on node-b; GPU 1 of node-b: 70 GiB used outside Nebula"}


def test_the_reserve_is_named_when_it_is_what_keeps_a_model_out() -> None:
    r = place({"m": model("m", mem_gib=80)}, {"n": node("n", gpu(0, 80))}, {}, gpu_reserve_mib=1024)
    assert r.pending == {"m": "needs 80 GiB on one GPU; largest free is 79 GiB on n; 1 GiB of each GPU is kept "
                              "free ([scheduler] gpu_headroom_mib)"}


def test_outside_use_that_grows_never_evicts_a_running_replica() -> None:
    first = place({"m": model("m", mem_gib=40)}, {"n": node("n", gpu(0, 80))}, {}).placements
    crowded = {"n": node("n", gpu(0, 80, outside_gib=60))}
    assert place({"m": model("m", mem_gib=40)}, crowded, first).placements == first


def test_heterogeneous_gpus_on_one_node_pack_small_models_on_the_small_gpu() -> None:
    nodes = {"n": node("n", gpu(0, 80), gpu(1, 24))}
    r = place({"small": model("small", mem_gib=16), "big": model("big", mem_gib=70)}, nodes, {})
    assert r.pending == {}
    assert r.placements["small"].gpu_indices == (1,) and r.placements["big"].gpu_indices == (0,)


def test_each_gpu_of_a_replica_must_hold_the_per_gpu_need() -> None:
    nodes = {"n": node("n", gpu(0, 80), gpu(1, 24))}
    r = place({"tp": model("tp", gpus=2, mem_gib=30)}, nodes, {})
    assert r.pending == {"tp": "needs 2 GPUs with 30 GiB free on one node; at most 1 on n"}
    mixed = {"n": node("n", gpu(0, 80), gpu(1, 24)), "m": node("m", gpu(0, 48), gpu(1, 40))}
    assert place({"tp": model("tp", gpus=2, mem_gib=30)}, mixed, {}).placements["tp"].node == "m"


def test_a_tensor_parallel_replica_takes_gpus_of_one_link_group() -> None:
    # GPUs 0,1 on one switch, 2,3 on another: 1 is taken, so the pair goes to 2,3 rather than 0 and 2.
    nodes = {"n": node("n", gpu(0, 80, group=0), gpu(1, 80, outside_gib=75, group=0), gpu(2, 80, group=2),
                       gpu(3, 80, group=2))}
    assert place({"tp": model("tp", gpus=2, mem_gib=40)}, nodes, {}).placements["tp"].gpu_indices == (2, 3)
    # With no group holding two, any two that fit.
    split = {"n": node("n", gpu(0, 80, group=0), gpu(1, 80, 75, group=0), gpu(2, 80, group=2),
                       gpu(3, 80, 75, group=2))}
    assert place({"tp": model("tp", gpus=2, mem_gib=40)}, split, {}).placements["tp"].gpu_indices == (0, 2)


SIZES = st.sampled_from([16, 24, 40, 48, 80, 141])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replicas=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    gpu_need=st.lists(st.integers(1, 4), min_size=5, max_size=5),
    mem_need=st.lists(st.integers(1, 90), min_size=5, max_size=5),
    nodes_gpus=st.lists(st.lists(st.tuples(SIZES, st.integers(0, 100), st.integers(0, 1)), max_size=4),
                        min_size=1, max_size=4),
    reserve=st.sampled_from([0, 1024]),
)
def test_properties_with_outside_use_and_mixed_sizes(replicas: list[int], gpu_need: list[int], mem_need: list[int],
                                                     nodes_gpus: list[list[tuple[int, int, int]]],
                                                     reserve: int) -> None:
    models = {f"m{i}": model(f"m{i}", r, gpus=gpu_need[i], mem_gib=mem_need[i]) for i, r in enumerate(replicas)}
    nodes = {f"n{i}": node(f"n{i}", *(gpu(j, size, size * pct / 100, group=grp * 2)
                                      for j, (size, pct, grp) in enumerate(gs)))
             for i, gs in enumerate(nodes_gpus)}
    r = place(models, nodes, {}, gpu_reserve_mib=reserve)
    used: dict[tuple[str, int], int] = {}
    for p in r.placements.values():
        assert len(set(p.gpu_indices)) == p.model.gpus_per_replica
        for g in p.gpu_indices:
            used[(p.node, g)] = used.get((p.node, g), 0) + p.model.gpu_memory_mib
    for (name, index), mib in used.items():
        held = next(g for g in nodes[name].gpus if g.index == index)
        assert mib <= held.memory_total_mib - reserve - held.memory_outside_mib, "a GPU is over-committed"
    for name, m in models.items():
        assert sum(1 for p in r.placements.values() if p.model.name == name) == m.replicas or name in r.pending
    for reason in r.pending.values():
        assert reason and "no node fits" not in reason
    # No churn when nothing changed, and none when outside use grows afterwards either.
    assert place(models, nodes, r.placements, gpu_reserve_mib=reserve).placements == r.placements
    fuller = {n: NodeRecord(name=rec.name, address=rec.address, port_min=rec.port_min, port_max=rec.port_max,
                            gpus=tuple(Gpu(g.index, g.name, g.memory_total_mib, g.memory_total_mib,
                                           memory_outside_mib=g.memory_total_mib) for g in rec.gpus))
              for n, rec in nodes.items()}
    assert place(models, fuller, r.placements, gpu_reserve_mib=reserve).placements == r.placements


def test_a_model_pinned_to_an_engine_runtime_goes_only_where_it_is_installed() -> None:
    pinned = replace(model("m", mem_gib=10), engine_runtime="vllm-0.32-cu13")
    old = replace(node("old", gpu(0, 80)), runtimes=("vllm-0.31-cu12",))
    new = replace(node("new", gpu(0, 80)), runtimes=("vllm-0.31-cu12", "vllm-0.32-cu13"))
    r = place({"m": pinned}, {"old": old, "new": new}, {})
    assert [p.node for p in r.placements.values()] == ["new"]
    nowhere = place({"m": pinned}, {"old": old}, {})
    assert not nowhere.placements
    assert nowhere.pending["m"].startswith("no live node has engine runtime vllm-0.32-cu13 installed"), nowhere.pending
    unpinned = place({"m": model("m", mem_gib=10)}, {"old": old}, {})
    assert [p.node for p in unpinned.placements.values()] == ["old"], "the default runtime is every node's"
