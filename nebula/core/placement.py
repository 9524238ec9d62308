"""Placement: which node runs which replica. A pure function of desired models, live nodes and the
current placements, so it can be tested exhaustively and never churns when nothing changed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from nebula.core.model import ModelSpec, NodeRecord, Placement, instance_name
from nebula.core.sources import source_id


@dataclass(frozen=True)
class PlacementResult:
    placements: Mapping[str, Placement]
    """Every placement that should exist, by instance name."""
    pending: Mapping[str, str] = field(default_factory=dict)
    """Models with replicas that fit nowhere, with the reason (for people), by model name."""


@dataclass
class _NodeCapacity:
    node: NodeRecord
    gpu_free_mib: dict[int, int]
    used_ports: set[int]
    replicas_by_model: dict[str, int]
    total_free_mib: int = 0
    cached: frozenset[str] = frozenset()
    next_port: int = 0
    """Every port below it is taken: ports are only ever taken during a pass, so the lowest free one only rises."""

    def free_gpus(self, need_mib: int) -> list[int]:
        return sorted((i for i, free in self.gpu_free_mib.items() if free >= need_mib),
                      key=lambda i: (-self.gpu_free_mib[i], i))

    def free_port(self) -> int | None:
        port = max(self.next_port, self.node.port_min)
        while port in self.used_ports:
            port += 1
        self.next_port = port
        return port if port <= self.node.port_max else None

    def take(self, p: Placement) -> None:
        for i in p.gpu_indices:
            self.gpu_free_mib[i] = self.gpu_free_mib.get(i, 0) - p.model.gpu_memory_mib
            self.total_free_mib -= p.model.gpu_memory_mib
        self.used_ports.add(p.port)
        self.replicas_by_model[p.model.name] = self.replicas_by_model.get(p.model.name, 0) + 1


def _capacities(nodes: Iterable[NodeRecord]) -> dict[str, _NodeCapacity]:
    return {n.name: _NodeCapacity(node=n, gpu_free_mib={g.index: g.memory_total_mib for g in n.gpus},
                                  used_ports=set(), replicas_by_model={},
                                  total_free_mib=sum(g.memory_total_mib for g in n.gpus),
                                  cached=frozenset(n.cached)) for n in nodes}


def _matches_labels(model: ModelSpec, node: NodeRecord) -> bool:
    return all(node.labels.get(k) == v for k, v in model.labels.items())


def place(models: Mapping[str, ModelSpec], nodes: Mapping[str, NodeRecord],
          current: Mapping[str, Placement], *, retained_nodes: Iterable[str] = ()) -> PlacementResult:
    """Compute the placements that should exist.

    - A current placement stays where it is while its node is live (or in `retained_nodes`: gone for less
      than the grace period) and its replica is still desired; its spec follows the model's spec.
    - A desired replica with no placement goes to the matching node with the fewest replicas of the same
      model (spread), then one that already holds the model's weights (no download), then the most free GPU
      memory, then by name (deterministic); GPUs are bin-packed by declared memory; the port is the node's
      lowest free one. Only nodes with the capacity are ranked, so neither preference overrides capacity,
      and spread ranks first, so the cache never stacks replicas on one node while another has none.
    - A model with replicas that fit nowhere is in `pending` with the reason.
    """
    keep_on = set(nodes) | set(retained_nodes)
    caps = _capacities(nodes.values())
    result: dict[str, Placement] = {}
    # Existing placements first, so capacity and ports they hold are not handed out again.
    for inst, p in sorted(current.items()):
        model = models.get(p.model.name)
        if model is None or p.node not in keep_on or _replica_index(inst, model) is None:
            continue
        one = _one_replica(model)
        kept = p if p.model == one else replace(p, model=one)
        result[inst] = kept
        if p.node in caps:
            caps[p.node].take(kept)

    pending: dict[str, str] = {}
    for name in sorted(models):
        model = models[name]
        sid = source_id(model.source, model.revision)
        unplaced = 0
        reason = ""
        for r in range(model.replicas):
            inst = instance_name(name, r)
            if inst in result:
                continue
            placed = _place_one(inst, model, caps, sid)
            if isinstance(placed, str):
                unplaced += 1
                reason = placed
                continue
            result[inst] = placed
            caps[placed.node].take(placed)
        if unplaced:
            pending[name] = reason if unplaced == model.replicas else (
                f"{model.replicas - unplaced} of {model.replicas} replicas placed; the others: {reason}")
    return PlacementResult(placements=result, pending=pending)


def _one_replica(model: ModelSpec) -> ModelSpec:
    # A placement describes one replica: scaling a model must not rewrite its other placements.
    return replace(model, replicas=1)


def _replica_index(inst: str, model: ModelSpec) -> int | None:
    for r in range(model.replicas):
        if instance_name(model.name, r) == inst:
            return r
    return None


def _place_one(inst: str, model: ModelSpec, caps: Mapping[str, _NodeCapacity], sid: str | None
               ) -> Placement | str:
    # Rank every fitting node by a cheap key first; build the placement for the winner only (this loop runs
    # replicas x nodes times on a first placement of a fleet).
    best: tuple[tuple[int, int, int, str], _NodeCapacity, list[int], int] | None = None
    why = _Shortfall()
    need = model.gpus_per_replica
    for cap in caps.values():
        if model.labels and not _matches_labels(model, cap.node):
            continue
        why.matching += 1
        gpus: list[int] = []
        if need:
            largest = max(cap.gpu_free_mib.values(), default=0)
            if largest < model.gpu_memory_mib or len(cap.gpu_free_mib) < need:
                fitting = len(cap.free_gpus(model.gpu_memory_mib)) if largest >= model.gpu_memory_mib else 0
                why.short_of_gpus(cap, largest, fitting)
                continue
            free = cap.free_gpus(model.gpu_memory_mib)
            if len(free) < need:
                why.short_of_gpus(cap, largest, len(free))
                continue
            gpus = free[:need]
        cached = 0 if sid is not None and sid in cap.cached else 1
        key = (cap.replicas_by_model.get(model.name, 0), cached, -cap.total_free_mib, cap.node.name)
        if best is not None and key >= best[0]:
            continue
        port = cap.free_port()
        if port is None:
            why.no_port.append(cap.node.name)
            continue
        best = (key, cap, gpus, port)
    if best is not None:
        _, cap, gpus, port = best
        return Placement(instance=inst, node=cap.node.name, model=_one_replica(model), port=port,
                         gpu_indices=tuple(sorted(gpus)))
    return why.reason(model, has_nodes=bool(caps))


@dataclass
class _Shortfall:
    """What the nodes lacked, gathered while ranking them, to say why a replica fits nowhere."""

    matching: int = 0
    gpu_short: int = 0
    any_gpus: bool = False
    largest_free: int = 0
    largest_node: str = ""
    best_count: int = 0
    best_count_node: str = ""
    no_port: list[str] = field(default_factory=list)

    def short_of_gpus(self, cap: _NodeCapacity, largest: int, count: int) -> None:
        self.gpu_short += 1
        self.any_gpus = self.any_gpus or bool(cap.gpu_free_mib)
        if largest > self.largest_free or not self.largest_node:
            self.largest_free, self.largest_node = largest, cap.node.name
        if count > self.best_count or not self.best_count_node:
            self.best_count, self.best_count_node = count, cap.node.name

    def reason(self, model: ModelSpec, *, has_nodes: bool) -> str:
        if not has_nodes:
            return "no live nodes"
        if not self.matching:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(model.labels.items()))
            return f"no live node has the labels {labels}"
        need, mem = model.gpus_per_replica, model.gpu_memory_mib
        parts = []
        if need and self.gpu_short:
            if not self.any_gpus:
                parts.append(f"needs {_gpus(need)}; no live node{' with its labels' if model.labels else ''} "
                             "has a GPU")
            elif self.largest_free < mem:
                per = "one GPU" if need == 1 else f"each of {need} GPUs"
                parts.append(f"needs {mib_text(mem)} on {per}; largest free is {mib_text(self.largest_free)} "
                             f"on {self.largest_node}")
            else:
                free = f" with {mib_text(mem)} free" if mem else ""
                parts.append(f"needs {need} GPUs{free} on one node; at most {self.best_count} on "
                             f"{self.best_count_node}")
        if self.no_port:
            parts.append(f"no free engine port on {', '.join(sorted(self.no_port))}")
        return "; ".join(parts) or "no node fits"


def _gpus(n: int) -> str:
    return "1 GPU" if n == 1 else f"{n} GPUs"


def mib_text(mib: int) -> str:
    """4000 -> '3.9 GiB', 40960 -> '40 GiB', 512 -> '512 MiB'."""
    if mib < 1024:
        return f"{mib} MiB"
    return f"{mib / 1024:.1f}".removesuffix(".0") + " GiB"


def diff_placements(current: Mapping[str, Placement], wanted: Mapping[str, Placement]
                    ) -> tuple[list[Placement], list[Placement]]:
    """(to_write, to_delete): the writes that turn `current` into `wanted`."""
    to_write = [p for i, p in sorted(wanted.items()) if current.get(i) != p]
    to_delete = [p for i, p in sorted(current.items())
                 if i not in wanted or wanted[i].node != p.node]
    return to_write, to_delete
