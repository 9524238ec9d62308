"""core/drain.py: which node can take a model instead, and why a drain would strand one."""

from __future__ import annotations

from nebula.core.drain import can_hold, drain_blockers, holders, stranded
from nebula.core.model import Gpu, ModelSpec, NodeRecord, Placement


def node(name: str, gpus: int = 0, labels: dict[str, str] | None = None) -> NodeRecord:
    return NodeRecord(name=name, address="10.0.0.1", port_min=18000, port_max=18009, labels=labels or {},
                      gpus=tuple(Gpu(i, "H100", 80_000, 0) for i in range(gpus)))


def model(name: str, **kw: object) -> ModelSpec:
    return ModelSpec.from_dict({"name": name, "source": "/m", **kw})


def on(inst: str, m: ModelSpec, n: str) -> Placement:
    return Placement(instance=inst, node=n, model=m, port=18000)


def test_can_hold_weighs_labels_runtime_and_gpu_count() -> None:
    assert can_hold(model("a"), node("n1"))
    assert not can_hold(model("a", labels={"zone": "b"}), node("n1"))
    assert not can_hold(model("a", gpus_per_replica=2), node("n1", gpus=1))
    assert not can_hold(model("a", engine_runtime="vllm-0.99-cu12"), node("n1"))
    assert holders(model("a"), [node("n1"), node("n2")], drained={"n1"}) == ["n2"]


def test_the_last_node_that_can_hold_a_model_is_a_blocker_with_the_reason() -> None:
    gpu = model("g", gpus_per_replica=1)
    cpu = model("c")
    nodes = {"n1": node("n1", gpus=1), "n2": node("n2")}
    ps = [on("g", gpu, "n1"), on("c", cpu, "n1")]
    assert drain_blockers("n1", {"g": gpu, "c": cpu}, nodes, ps, drained=set()) == [
        "model 'g' runs on n1 and no other undrained live node can hold it (it needs 1 GPU(s))"]
    assert drain_blockers("n2", {"g": gpu, "c": cpu}, nodes, ps, drained=set()) == []
    assert drain_blockers("n1", {"c": cpu}, nodes, [on("c", cpu, "n1")], drained={"n2"}) == [
        "model 'c' runs on n1 and no other undrained live node can hold it"]


def test_stranded_are_only_the_force_drained_with_nowhere_to_go() -> None:
    gpu, cpu = model("g", gpus_per_replica=1), model("c")
    nodes = {"n1": node("n1", gpus=1), "n2": node("n2")}
    ps = [on("g", gpu, "n1"), on("c", cpu, "n1")]
    models = {"g": gpu, "c": cpu}
    assert stranded(models, nodes, ps, forced={"n1"}, drained={"n1"}) == {"g"}
    assert stranded(models, nodes, ps, forced=set(), drained={"n1"}) == frozenset()
