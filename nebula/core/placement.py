"""Placement: which node runs which replica. A pure function of desired models, live nodes and the
current placements, so it can be tested exhaustively and never churns when nothing changed."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from nebula.core.engine_runtime import node_has_runtime
from nebula.core.model import Gpu, ModelSpec, NodeRecord, Placement
from nebula.core.rollout import free_instances, one_replica, replica_order, same_engine
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
    """What each GPU can still take: its total, less the reserve, less what processes outside Nebula use, less
    what placements already hold."""
    used_ports: set[int]
    replicas_by_model: dict[str, int]
    total_free_mib: int = 0
    cached: frozenset[str] = frozenset()
    next_port: int = 0
    """Every port below it is taken: ports are only ever taken during a pass, so the lowest free one only rises."""
    groups: dict[int, int] = field(default_factory=dict)
    """Each GPU's link group (Gpu.link_group)."""

    def free_gpus(self, need_mib: int) -> list[int]:
        """The GPUs that can hold `need_mib`, best first: a declared need goes where it fits tightest (large
        GPUs stay free for large models: bin-packing), an undeclared one (0) where the most is free."""
        fitting = [i for i, free in self.gpu_free_mib.items() if free >= need_mib]
        sign = 1 if need_mib else -1
        return sorted(fitting, key=lambda i: (sign * self.gpu_free_mib[i], i))

    def pick_gpus(self, need_mib: int, count: int) -> list[int]:
        """`count` GPUs that each hold `need_mib`, inside one link group when one has enough (the tightest
        such group), else the best `count` of the node; [] when the node has fewer."""
        free = self.free_gpus(need_mib)
        if len(free) < count:
            return []
        if count == 1:
            return free[:1]
        by_group: dict[int, list[int]] = {}
        for i in free:  # keeps the best-first order inside each group
            by_group.setdefault(self.groups.get(i, 0), []).append(i)
        whole = [g[:count] for g in by_group.values() if len(g) >= count]
        if not whole:
            return free[:count]
        return min(whole, key=lambda g: (sum(self.gpu_free_mib[i] for i in g) * (1 if need_mib else -1), g))

    def free_port(self) -> int | None:
        port = max(self.next_port, self.node.port_min)
        while port in self.used_ports:
            port += 1
        self.next_port = port
        return port if port <= self.node.port_max else None

    def take(self, p: Placement, *, counts: bool = True) -> None:
        """Hold `p`'s GPU memory and port; `counts`: it counts toward its model's spread (an outdated replica a
        rolling replace is about to retire does not, so its successor may go where it is)."""
        # An engine asleep at level 2 has discarded its weights and KV cache: its GPU memory is free for others
        # (level 1 keeps the weights in host memory but the engine's CUDA context and allocator hold on: it counts
        # as placed). Waking a level-2 sleeper takes its memory back, wherever something else took it meanwhile.
        mem = 0 if p.sleep_level == 2 else p.model.gpu_memory_mib
        for i in p.gpu_indices:
            self.gpu_free_mib[i] = self.gpu_free_mib.get(i, 0) - mem
            self.total_free_mib -= mem
        self.used_ports.add(p.port)
        if counts:
            self.replicas_by_model[p.model.name] = self.replicas_by_model.get(p.model.name, 0) + 1


def gpu_capacity_mib(gpu: Gpu, reserve_mib: int) -> int:
    """What Nebula may place on `gpu`: its total less the reserve and less what is used outside Nebula
    (other processes, the driver), never below 0."""
    return max(0, gpu.memory_total_mib - reserve_mib - gpu.memory_outside_mib)


def _capacities(nodes: Iterable[NodeRecord], reserve_mib: int) -> dict[str, _NodeCapacity]:
    caps = {}
    for n in nodes:
        free = {g.index: gpu_capacity_mib(g, reserve_mib) for g in n.gpus}
        caps[n.name] = _NodeCapacity(node=n, gpu_free_mib=free, used_ports=set(), replicas_by_model={},
                                     total_free_mib=sum(free.values()), cached=frozenset(n.cached),
                                     groups={g.index: g.link_group for g in n.gpus})
    return caps


def _matches_labels(model: ModelSpec, node: NodeRecord) -> bool:
    return all(node.labels.get(k) == v for k, v in model.labels.items())


def place(models: Mapping[str, ModelSpec], nodes: Mapping[str, NodeRecord],
          current: Mapping[str, Placement], *, retained_nodes: Iterable[str] = (),
          gpu_reserve_mib: int = 0, surge: Mapping[str, int] | None = None, drained: Collection[str] = (),
          taken: Collection[str] = (), held_ports: Mapping[str, Collection[int]] | None = None) -> PlacementResult:
    """Compute the placements that should exist.

    - A model has `replicas` placements, plus `surge[model]` during a rolling replace (core/rollout.py).
    - A current placement stays where it is while its node is live (or in `retained_nodes`: gone for less
      than the grace period) and its replica is still desired (beyond the count, the highest-numbered go,
      those running an outdated engine first). Its spec follows the model's only where that restarts nothing
      (node labels); an engine change is the rollout planner's to roll, one replica at a time.
    - A new replica takes the lowest free instance name: not a kept placement's, nor in `taken` (instances
      still reported, e.g. draining elsewhere: one name, one instance record). Names may so become sparse.
    - Nothing new goes to a `drained` node; what runs there stays until the rollout planner moves it.
    - `held_ports` (node -> ports) are engines still running without a placement (draining): not handed out.
    - A desired replica with no placement goes to the matching node with the fewest replicas of the same
      model (spread), then one that already holds the model's weights (no download), then the most free GPU
      memory, then by name (deterministic); the port is the node's lowest free one.
    - A GPU holds what its total less `gpu_reserve_mib` less the memory used outside Nebula (the node record's
      NVML reading) leaves; each of a replica's GPUs must hold the declared per-GPU need. GPUs are bin-packed
      (the tightest fit), and a replica's GPUs are taken from one link group (NVLink / PCIe switch) when one
      has enough. Kept placements are never re-checked against capacity: outside use that grew since does
      not evict a running replica. Only nodes with the capacity are ranked, so neither preference overrides capacity,
      and spread ranks first, so the cache never stacks replicas on one node while another has none.
    - A model with replicas that fit nowhere is in `pending` with the reason.
    """
    keep_on = set(nodes) | set(retained_nodes)
    caps = _capacities(nodes.values(), gpu_reserve_mib)
    for node_name, ports in (held_ports or {}).items():
        if node_name in caps:
            caps[node_name].used_ports.update(ports)
    surge = surge or {}
    result: dict[str, Placement] = {}
    # Existing placements first, so capacity and ports they hold are not handed out again.
    by_model: dict[str, list[Placement]] = {}
    for p in current.values():
        if p.model.name in models and p.node in keep_on:
            by_model.setdefault(p.model.name, []).append(p)
    for name, held in sorted(by_model.items()):
        model = models[name]
        one = one_replica(model)
        held.sort(key=lambda p: (not same_engine(p.model, one), replica_order(p.instance)))
        for p in held[:model.replicas + surge.get(name, 0)]:
            # Labels only (the engine is the same): rewrite in place; else the rollout planner rolls it.
            kept = p if p.model == one or not same_engine(p.model, one) else replace(p, model=one)
            result[p.instance] = kept
            if p.node in caps:
                caps[p.node].take(kept, counts=same_engine(p.model, one) and p.node not in drained)

    pending: dict[str, str] = {}
    blocked = frozenset(drained)
    for name in sorted(models):
        model = models[name]
        sid = source_id(model.source, model.revision)
        have = sum(1 for p in result.values() if p.model.name == name)
        wanted = model.replicas + surge.get(name, 0)
        names = free_instances(name, set(result) | set(taken), wanted - have) if wanted > have else []
        unplaced = wanted - have - len(names)
        reason = "no free instance name" if unplaced else ""
        for inst in names:
            placed = _place_one(inst, model, caps, sid, gpu_reserve_mib, blocked)
            if isinstance(placed, str):
                unplaced += 1
                reason = placed
                continue
            result[inst] = placed
            caps[placed.node].take(placed)
        if unplaced:
            pending[name] = reason if unplaced == wanted else (
                f"{wanted - unplaced} of {wanted} replicas placed; the others: {reason}")
    return PlacementResult(placements=result, pending=pending)


def _place_one(inst: str, model: ModelSpec, caps: Mapping[str, _NodeCapacity], sid: str | None, reserve_mib: int,
               drained: frozenset[str] = frozenset()) -> Placement | str:
    # Rank every fitting node by a cheap key first; build the placement for the winner only (this loop runs
    # replicas x nodes times on a first placement of a fleet).
    best: tuple[tuple[int, int, int, str], _NodeCapacity, list[int], int] | None = None
    why = _Shortfall(reserve_mib=reserve_mib)
    need, mem = model.gpus_per_replica, model.gpu_memory_mib
    for cap in caps.values():
        if model.labels and not _matches_labels(model, cap.node):
            continue
        if cap.node.name in drained:
            why.drained += 1
            continue
        if not node_has_runtime(cap.node, model.engine_runtime):
            why.without_runtime += 1
            continue
        why.matching += 1
        gpus: list[int] = []
        if need:
            gpus = cap.pick_gpus(mem, need) if len(cap.gpu_free_mib) >= need else []
            if not gpus:
                why.short_of_gpus(cap, mem)
                continue
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
        return Placement(instance=inst, node=cap.node.name, model=one_replica(model), port=port,
                         gpu_indices=tuple(sorted(gpus)))
    return why.reason(model, has_nodes=bool(caps))


@dataclass
class _Shortfall:
    """What the nodes lacked, gathered while ranking them, to say why a replica fits nowhere."""

    matching: int = 0
    drained: int = 0
    """Nodes (with the model's labels) that are drained (`nebula node drain`)."""
    without_runtime: int = 0
    """Nodes (with the model's labels) that lack the engine runtime it is pinned to."""
    gpu_short: int = 0
    any_gpus: bool = False
    largest_free: int = 0
    largest_node: str = ""
    best_count: int = 0
    best_count_node: str = ""
    no_port: list[str] = field(default_factory=list)
    outside: list[tuple[int, str, int]] = field(default_factory=list)
    """(MiB used outside Nebula, node, GPU index) of each GPU that would hold the need but for that use."""
    reserve_mib: int = 0
    reserved: bool = False
    """Some GPU would hold the need but for the reserve."""

    def short_of_gpus(self, cap: _NodeCapacity, mem: int) -> None:
        largest = max(cap.gpu_free_mib.values(), default=0)
        count = sum(1 for free in cap.gpu_free_mib.values() if free >= mem)
        self.gpu_short += 1
        self.any_gpus = self.any_gpus or bool(cap.gpu_free_mib)
        if largest > self.largest_free or not self.largest_node:
            self.largest_free, self.largest_node = largest, cap.node.name
        if count > self.best_count or not self.best_count_node:
            self.best_count, self.best_count_node = count, cap.node.name
        for g in cap.node.gpus:
            free = cap.gpu_free_mib.get(g.index, 0)
            if free >= mem:
                continue
            if g.memory_outside_mib and free + g.memory_outside_mib >= mem:
                self.outside.append((g.memory_outside_mib, cap.node.name, g.index))
            elif self.reserve_mib and free + self.reserve_mib >= mem:
                self.reserved = True

    def reason(self, model: ModelSpec, *, has_nodes: bool) -> str:
        if not has_nodes:
            return "no live nodes"
        if not self.matching and self.drained and not self.without_runtime:
            return f"every live node{' with its labels' if model.labels else ''} is drained (nebula node undrain NODE)"
        if not self.matching and self.without_runtime:
            return (f"no live node{' with its labels' if model.labels else ''} has engine runtime "
                    f"{model.engine_runtime} installed (scripts/install-engine.sh on a node; nodes advertise theirs)")
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
            parts += self._outside_text()
            if self.reserved:
                parts.append(f"{mib_text(self.reserve_mib)} of each GPU is kept free ([scheduler] gpu_headroom_mib)")
        if self.no_port:
            parts.append(f"no free engine port on {', '.join(sorted(self.no_port))}")
        return "; ".join(parts) or "no node fits"

    def _outside_text(self) -> list[str]:
        if not self.outside:
            return []
        # The GPU with the most outside use: the one an operator most likely wants to look at.
        mib, node, index = max(self.outside, key=lambda o: (o[0], o[1], -o[2]))
        return [f"GPU {index} of {node}: {mib_text(mib)} used outside Nebula"]


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
