"""How many GPUs one replica of a model needs, and how much memory on each: decided before a load is stored.

Pure: from the spec, the model's profile (core/model_facts.py), the live nodes' GPUs and [models]:
- max_model_len = the spec's value, else [engine] default_max_model_len, capped by the model's own limit
  (core/model_limits.engine_max_model_len); a request above the limit is a ValidationError naming it;
- tensor_parallel = the spec's, else the smallest power of two of GPUs on ONE node whose per-GPU estimate
  (core/memory.py) fits that node's GPUs (each GPU's total less [scheduler] gpu_headroom_mib and less what
  is used outside Nebula, as placement counts it). Whether Nebula's own replicas leave room now is
  placement's question, not this one's;
- what the spec declares (gpus_per_replica, tensor_parallel_size, gpu_memory_mib) always wins, but a
  declared size whose estimate fits no GPU is refused with the numbers unless forced.
A fleet without GPUs sizes nothing: the replica runs on CPUs (gpus_per_replica 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nebula.core.config import ModelsConfig
from nebula.core.memory import GIB, MIB, MemoryEstimate, estimate
from nebula.core.model import ModelSpec, NodeRecord
from nebula.core.model_limits import ModelLimit, engine_max_model_len
from nebula.core.placement import gpu_capacity_mib
from nebula.core.profile import ModelProfile

VLLM_DEFAULT_LEN = 2048
"""What vLLM assumes when a model's files name no length."""
MAX_TP = 16
DEFAULT_RESERVE_MIB = 1024
"""[scheduler] gpu_headroom_mib's default: the same reserve placement keeps."""


@dataclass(frozen=True)
class Sizing:
    max_model_len: int | None
    """The engine's --max-model-len; None leaves it to vLLM (no limit known, no default)."""
    tensor_parallel: int
    gpus_per_replica: int
    gpu_memory_mib: int
    """Per GPU."""
    explanation: str
    estimate: MemoryEstimate | None = None


@dataclass(frozen=True)
class Refusal:
    reason: str
    """One line with the numbers, e.g. `needs 140.2 GiB per GPU at tensor-parallel 1, ...`."""


def size(spec: ModelSpec, profile: ModelProfile | None, nodes: Sequence[NodeRecord], cfg: ModelsConfig,
         default_max_model_len: int = 0, force: bool = False, reserve_mib: int = DEFAULT_RESERVE_MIB
         ) -> Sizing | Refusal:
    """The replica's size, or why no node's GPUs can hold it. ValidationError: max_model_len over the limit."""
    limit = _limit(profile)
    max_len = engine_max_model_len(spec.max_model_len, default_max_model_len, limit)
    gpus = [(n.name, [gpu_capacity_mib(g, reserve_mib) for g in n.gpus]) for n in nodes if n.gpus]
    declared_tp = spec.tensor_parallel_size or spec.gpus_per_replica or 0
    if not gpus:
        return Sizing(max_len, 1, 0, 0, "no node has a GPU: the replica runs on CPUs, nothing to size")
    if spec.gpu_memory_mib and spec.gpus_per_replica:
        tp = spec.tensor_parallel_size or spec.gpus_per_replica
        return Sizing(max_len, tp, spec.gpus_per_replica, spec.gpu_memory_mib,
                      f"as declared: {spec.gpus_per_replica} GPU(s) of {spec.gpu_memory_mib} MiB each")
    if profile is None or profile.weight_bytes <= 0:
        tp = declared_tp or 1
        return Sizing(max_len, tp, max(spec.gpus_per_replica, tp), spec.gpu_memory_mib,
                      "no memory estimate (the model's files were not read): "
                      + (f"{spec.gpu_memory_mib} MiB per GPU as declared" if spec.gpu_memory_mib
                         else "placement counts its GPU memory as 0 unless gpu_memory_mib is declared"))
    tokens = max_len or (limit.tokens if limit is not None else VLLM_DEFAULT_LEN)

    def need(tp: int) -> MemoryEstimate:
        return estimate(profile, tokens, tp, cfg.kv_concurrency, _kv_dtype(spec),
                        overhead_mib=cfg.activation_overhead_mib)

    if spec.gpu_memory_mib:  # declared memory per GPU, GPUs not declared: one replica on tensor_parallel GPUs
        tp = spec.tensor_parallel_size or 1
        return _declared(max_len, tp, tp, spec.gpu_memory_mib, need(tp), gpus, force,
                         f"declared {spec.gpu_memory_mib} MiB per GPU (the estimate {need(tp).explain()})")
    if declared_tp:
        est = need(declared_tp)
        return _declared(max_len, declared_tp, max(spec.gpus_per_replica, declared_tp), est.total_mib, est, gpus,
                         force, f"as declared, {est.explain()}")
    most = max(len(caps) for _, caps in gpus)
    tried: list[MemoryEstimate] = []
    tp = 1
    while tp <= min(most, MAX_TP):
        if _splits(profile, tp):
            est = need(tp)
            tried.append(est)
            node = _fitting_node(gpus, tp, est.total_mib)
            if node is not None:
                return Sizing(max_len, tp, tp, est.total_mib, _chosen(tried, node, gpus), est)
        tp *= 2
    shown = ", ".join(f"{_gib(e.total_mib)} at tensor-parallel {e.tensor_parallel}" for e in tried)
    if force:
        return _pending_size(max_len, need, profile, gpus, tp, shown)
    return Refusal(f"needs {shown} per GPU ({tried[-1].explain()}); {_largest(gpus)}, and at most {most} GPU(s) "
                   "are on one node: lower max_model_len, add GPUs, or use a quantized model")


def _pending_size(max_len: int | None, need: Callable[[int], MemoryEstimate], profile: ModelProfile,
                  gpus: list[tuple[str, list[int]]], tp: int, shown: str) -> Sizing:
    """A forced load that fits no node now: sized for the fewest GPUs of today's largest size that would hold it
    (it waits pending for a node with that many), or the most tensor parallelism vLLM is given."""
    largest = max((c for _, caps in gpus for c in caps), default=0)
    est = need(tp)
    while tp < MAX_TP and (est.total_mib > largest or not _splits(profile, tp)):
        tp *= 2
        est = need(tp)
    return Sizing(max_len, tp, tp, est.total_mib, f"needs {shown} per GPU, more than any node holds now; forced: "
                  f"it waits pending for {tp} GPUs on one node ({est.explain()})", est)


def _declared(max_len: int | None, tp: int, gpu_count: int, per_gpu: int, est: MemoryEstimate,
              gpus: list[tuple[str, list[int]]], force: bool, why: str) -> Sizing | Refusal:
    node = _fitting_node(gpus, tp, per_gpu)
    if node is None and not force:
        return Refusal(f"needs {_gib(per_gpu)} on each of {tp} GPU(s) ({why}); no node has {tp} GPU(s) that large "
                       f"({_largest(gpus)}): lower max_model_len, declare more GPUs, or force the load to wait "
                       "pending")
    where = f"fits {node}" if node else "fits no node now (forced: it waits pending)"
    return Sizing(max_len, tp, gpu_count, per_gpu, f"{why}; {where}", est)


def _limit(profile: ModelProfile | None) -> ModelLimit | None:
    if profile is None or profile.max_positions <= 0:
        return None
    return ModelLimit(profile.max_positions, profile.derived.get("max_positions", "the model's profile"))


def _kv_dtype(spec: ModelSpec) -> str:
    """--kv-cache-dtype from the spec's engine_args (`--kv-cache-dtype fp8` or `=fp8`), else auto."""
    args = spec.engine_args
    for i, arg in enumerate(args):
        if arg.startswith("--kv-cache-dtype="):
            return arg.split("=", 1)[1]
        if arg == "--kv-cache-dtype" and i + 1 < len(args):
            return args[i + 1]
    return "auto"


def _splits(profile: ModelProfile, tp: int) -> bool:
    """vLLM shards KV heads evenly, or replicates them when fewer than the GPUs (then tp must divide by them)."""
    kv = profile.kv_heads
    if not kv or kv == 1:
        return True
    return kv % tp == 0 if kv >= tp else tp % kv == 0


def _fitting_node(gpus: list[tuple[str, list[int]]], tp: int, per_gpu_mib: int) -> str | None:
    for name, caps in gpus:
        if sum(1 for c in caps if c >= per_gpu_mib) >= tp:
            return name
    return None


def _chosen(tried: list[MemoryEstimate], node: str, gpus: list[tuple[str, list[int]]]) -> str:
    final = tried[-1]
    if len(tried) == 1:
        return f"{final.explain()}; fits {node}"
    first = tried[0]
    return (f"needs {_gib(first.total_mib)} at tensor-parallel {first.tensor_parallel}; {_largest(gpus)}; "
            f"at {final.tensor_parallel} GPUs {_gib(final.total_mib)} each fits {node} ({final.explain()})")


def _largest(gpus: list[tuple[str, list[int]]]) -> str:
    name, cap = max(((n, c) for n, caps in gpus for c in caps), key=lambda nc: nc[1])
    return f"the largest GPU holds {_gib(cap)} after the reserve (on {name})"


def _gib(mib: int) -> str:
    return f"{mib * MIB / GIB:.1f} GiB"
