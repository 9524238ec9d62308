#!/usr/bin/env python3
"""Placement benchmark: `place()` for 1,000 models on 200 simulated GPU nodes, and what moves when a node dies.

    .venv/bin/python scripts/bench_scheduler.py [--models 1000] [--nodes 200] [--seed 0]

Prints, from one run: the time of a first placement from scratch, of a steady-state pass (nothing changed:
must write nothing), and of the pass after one node dies; the number of placements that change then, against
the number of replicas the dead node held (goal: only those move, in under 1 s).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nebula.core.model import Gpu, ModelSpec, NodeRecord
from nebula.core.placement import PlacementResult, diff_placements, place


def fleet(n_nodes: int, rng: random.Random) -> dict[str, NodeRecord]:
    nodes = {}
    for i in range(n_nodes):
        gpus = rng.choice([4, 8, 8])
        mem = rng.choice([24_576, 81_920, 81_920])
        nodes[f"node-{i:03d}"] = NodeRecord(
            name=f"node-{i:03d}", address=f"10.0.{i // 250}.{i % 250}", port_min=18000, port_max=18999,
            gpus=tuple(Gpu(g, "GPU", mem, 0) for g in range(gpus)), labels={"zone": f"z{i % 4}"})
    return nodes


def catalogue(n_models: int, rng: random.Random) -> dict[str, ModelSpec]:
    models = {}
    for i in range(n_models):
        gpus = rng.choice([0, 1, 1, 1, 2])
        models[f"model-{i:04d}"] = ModelSpec.from_dict({
            "name": f"model-{i:04d}", "source": f"/models/m{i}", "replicas": rng.choice([1, 1, 2, 3]),
            "gpus_per_replica": gpus, "gpu_memory_mib": rng.choice([8_000, 16_000, 20_000]) if gpus else 0})
    return models


def timed(fn: Callable[[], PlacementResult]) -> tuple[float, PlacementResult]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    nodes, models = fleet(args.nodes, rng), catalogue(args.models, rng)

    t_first, first_r = timed(lambda: place(models, nodes, {}))
    first = first_r.placements
    t_steady, steady_r = timed(lambda: place(models, nodes, first))
    steady_writes, steady_deletes = diff_placements(first, steady_r.placements)

    victim = max(nodes, key=lambda n: sum(1 for p in first.values() if p.node == n))
    held = sum(1 for p in first.values() if p.node == victim)
    survivors = {n: r for n, r in nodes.items() if n != victim}
    t_dead, dead_r = timed(lambda: place(models, survivors, first))
    after = dead_r.placements
    writes, deletes = diff_placements(first, after)
    moved_other = [p for p in deletes if p.node != victim]

    replicas = sum(m.replicas for m in models.values())
    result = {
        "models": len(models), "nodes": len(nodes), "replicas": replicas, "placed": len(first),
        "pending_models": len(first_r.pending),
        "first_pass_s": round(t_first, 4), "steady_pass_s": round(t_steady, 4),
        "steady_changes": len(steady_writes) + len(steady_deletes),
        "node_death_pass_s": round(t_dead, 4), "dead_node_replicas": held,
        "placements_deleted": len(deletes), "placements_written": len(writes),
        "moved_from_other_nodes": len(moved_other),
    }
    print(f"{len(models)} models ({replicas} replicas) on {len(nodes)} nodes: {len(first)} placed, "
          f"{result['pending_models']} models with replicas pending")
    print(f"first placement        {t_first * 1000:8.1f} ms")
    print(f"steady pass            {t_steady * 1000:8.1f} ms   changes: {result['steady_changes']} (goal 0)")
    print(f"pass after node death  {t_dead * 1000:8.1f} ms   (goal < 1000 ms)")
    print(f"dead node held {held} replicas; deleted {len(deletes)}, written {len(writes)}, "
          f"moved from other nodes {len(moved_other)} (goal 0)")
    print(json.dumps(result))
    ok = t_dead < 1.0 and result["steady_changes"] == 0 and not moved_other and len(deletes) == held
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
