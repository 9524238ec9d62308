"""Node drain decisions, pure: which node could take a model's replicas instead, why a drain would strand a
model (the admin API refuses it unless forced), and which replicas a forced drain stops outright.

A drain moves replicas with the rolling replace's surge (core/rollout.py treats a placement on a drained node
as stale): a replacement elsewhere becomes ready before the old one drains. A model no other node can hold has
nowhere to go: refusing the drain says so; forcing it stops those replicas (the model waits, pending).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from nebula.core.engine_runtime import node_has_runtime
from nebula.core.model import ModelSpec, NodeRecord, Placement


def can_hold(model: ModelSpec, node: NodeRecord) -> bool:
    """The node could ever run a replica: the model's labels, its engine runtime, enough GPUs (memory aside:
    that is placement's to weigh, and may free up)."""
    return (all(node.labels.get(k) == v for k, v in model.labels.items())
            and node_has_runtime(node, model.engine_runtime) and len(node.gpus) >= model.gpus_per_replica)


def holders(model: ModelSpec, nodes: Iterable[NodeRecord], drained: Collection[str]) -> list[str]:
    """The live, undrained nodes that could hold the model, by name."""
    return sorted(n.name for n in nodes if n.name not in drained and can_hold(model, n))


def drain_blockers(node: str, models: Mapping[str, ModelSpec], nodes: Mapping[str, NodeRecord],
                   placements: Iterable[Placement], drained: Collection[str]) -> list[str]:
    """Why draining `node` would leave models with replicas there nowhere to run; [] when it would not."""
    others = [n for name, n in nodes.items() if name != node]
    out = []
    for name in sorted({p.model.name for p in placements if p.node == node}):
        model = models.get(name)
        if model is not None and not holders(model, others, drained):
            out.append(f"model '{name}' runs on {node} and no other undrained live node can hold it"
                       f"{_needs(model)}")
    return out


def stranded(models: Mapping[str, ModelSpec], nodes: Mapping[str, NodeRecord], placements: Iterable[Placement],
             forced: Collection[str], drained: Collection[str]) -> frozenset[str]:
    """Instances on force-drained nodes whose model no other node can hold: they stop now (nothing to wait for)."""
    out = set()
    for p in placements:
        model = models.get(p.model.name)
        if p.node in forced and model is not None and not holders(model, nodes.values(), drained):
            out.add(p.instance)
    return frozenset(out)


def _needs(model: ModelSpec) -> str:
    parts = []
    if model.labels:
        parts.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(model.labels.items())))
    if model.engine_runtime:
        parts.append(f"engine runtime {model.engine_runtime}")
    if model.gpus_per_replica:
        parts.append(f"{model.gpus_per_replica} GPU(s)")
    return f" (it needs {'; '.join(parts)})" if parts else ""
