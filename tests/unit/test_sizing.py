"""Sizing a replica: max_model_len, tensor-parallel size and per-GPU memory, or a refusal with the numbers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core import model_facts as mf
from nebula.core.config import ModelsConfig, parse_config
from nebula.core.families import Families
from nebula.core.memory import estimate
from nebula.core.model import Gpu, ModelSpec, NodeRecord
from nebula.core.profile import ModelProfile
from nebula.core.sizing import DEFAULT_RESERVE_MIB, Refusal, Sizing, size
from nebula.errors import ValidationError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model-configs"
H100 = 81559  # MiB, as NVML reports an H100 80GB HBM3
L4 = 23034
CFG = ModelsConfig()


def profile(name: str) -> ModelProfile:
    root = FIXTURES / name
    raw = {p.name: p.read_bytes() for p in root.iterdir() if p.name in mf.SMALL_FILES}
    return mf.derive_profile(mf.read_files(raw), Families(), name)


def node(name: str, *mib: int) -> NodeRecord:
    return NodeRecord(name=name, address="10.0.0.1", port_min=18000, port_max=18999,
                      gpus=tuple(Gpu(i, "GPU", m, 0) for i, m in enumerate(mib)))


def spec(**kw: object) -> ModelSpec:
    return ModelSpec(name="m", source="org/m", **kw)  # type: ignore[arg-type]


def sized(result: Sizing | Refusal) -> Sizing:
    assert isinstance(result, Sizing), result
    return result


DGX = [node("node-a", *[H100] * 8)]


def test_a_7b_model_takes_one_gpu_with_its_estimate() -> None:
    s = sized(size(spec(), profile("Qwen2.5-7B-Instruct"), DGX, CFG))
    assert (s.max_model_len, s.tensor_parallel, s.gpus_per_replica) == (32768, 1, 1)
    assert s.gpu_memory_mib == s.estimate.total_mib if s.estimate else False
    assert 17 * 1024 < s.gpu_memory_mib < 19 * 1024
    assert s.explanation.endswith("fits node-a")


def test_max_model_len_is_the_smallest_of_request_default_and_limit() -> None:
    p = profile("Qwen2.5-7B-Instruct")
    assert sized(size(spec(), p, DGX, CFG, default_max_model_len=2048)).max_model_len == 2048
    assert sized(size(spec(max_model_len=4096), p, DGX, CFG, default_max_model_len=2048)).max_model_len == 4096
    bert = profile("ms-marco-MiniLM-L-6-v2")
    assert sized(size(spec(), replace(bert, weight_bytes=90_000_000), DGX, CFG,
                      default_max_model_len=2048)).max_model_len == 512
    with pytest.raises(ValidationError, match="32768") as e:
        size(spec(max_model_len=65536), p, DGX, CFG)
    assert e.value.field == "max_model_len"


def test_70b_takes_two_gpus_at_short_context_and_four_at_full_context() -> None:
    p = profile("Llama-3.1-70B-Instruct")
    short = sized(size(spec(max_model_len=8192), p, DGX, CFG))
    assert (short.tensor_parallel, short.gpus_per_replica) == (2, 2)
    assert short.explanation.startswith("needs 135.9 GiB at tensor-parallel 1; the largest GPU holds 78.6 GiB")
    assert "at 2 GPUs 69.0 GiB each fits node-a" in short.explanation
    full = sized(size(spec(), p, DGX, CFG))
    assert (full.max_model_len, full.tensor_parallel) == (131072, 4)


def test_mixtral_takes_two_gpus() -> None:
    s = sized(size(spec(), profile("Mixtral-8x7B-Instruct-v0.1"), DGX, CFG))
    assert s.tensor_parallel == 2


def test_a_model_no_node_holds_is_refused_with_the_numbers() -> None:
    result = size(spec(max_model_len=8192), profile("Llama-3.1-70B-Instruct"), [node("node-b", L4, L4)], CFG)
    assert isinstance(result, Refusal)
    assert result.reason.startswith("needs 135.9 GiB at tensor-parallel 1, 69.0 GiB at tensor-parallel 2 per GPU")
    assert "the largest GPU holds 21.5 GiB after the reserve (on node-b), and at most 2 GPU(s)" in result.reason


def test_the_gpus_must_be_on_one_node() -> None:
    # Two nodes with one 80 GB GPU each cannot run a tensor-parallel-2 replica.
    result = size(spec(max_model_len=8192), profile("Llama-3.1-70B-Instruct"),
                  [node("a", H100), node("b", H100)], CFG)
    assert isinstance(result, Refusal)


def test_heterogeneous_gpus_pick_the_node_that_fits() -> None:
    nodes = [node("small", L4, L4, L4, L4), node("big", H100, H100, L4)]
    s = sized(size(spec(), profile("Qwen2.5-7B-Instruct"), nodes, CFG))
    assert s.tensor_parallel == 1 and s.explanation.endswith("fits small")  # 17.9 GiB fits an L4 after reserve
    # Mixtral needs 46 GiB per GPU at 2 and 24 GiB at 4: the two H100s of `big`, not four L4s (21.5 GiB each).
    s = sized(size(spec(max_model_len=8192), profile("Mixtral-8x7B-Instruct-v0.1"), nodes, CFG))
    assert s.tensor_parallel == 2 and "fits big" in s.explanation


def test_cpu_only_fleet_sizes_nothing() -> None:
    s = sized(size(spec(), profile("Qwen2.5-7B-Instruct"), [node("cpu")], CFG, default_max_model_len=2048))
    assert (s.gpus_per_replica, s.gpu_memory_mib, s.max_model_len) == (0, 0, 2048)
    assert "no node has a GPU" in s.explanation


def test_declared_sizes_win() -> None:
    p = profile("Qwen2.5-7B-Instruct")
    s = sized(size(spec(gpus_per_replica=2, gpu_memory_mib=30000), p, DGX, CFG))
    assert (s.tensor_parallel, s.gpus_per_replica, s.gpu_memory_mib) == (2, 2, 30000)
    s = sized(size(spec(gpus_per_replica=2, tensor_parallel_size=2), p, DGX, CFG))
    assert (s.tensor_parallel, s.gpus_per_replica) == (2, 2) and s.estimate is not None
    assert s.gpu_memory_mib == estimate(p, 32768, 2).total_mib


def test_a_declared_size_that_fits_no_gpu_is_refused_unless_forced() -> None:
    p = profile("Llama-3.1-70B-Instruct")
    result = size(spec(gpus_per_replica=1), p, DGX, CFG)
    assert isinstance(result, Refusal) and "no node has 1 GPU(s) that large" in result.reason
    assert result.reason.startswith("needs 173.4 GiB on each of 1 GPU(s) (as declared, at tensor-parallel 1: "
                                    "weights 131.4 GiB")
    forced = sized(size(spec(gpus_per_replica=1), p, DGX, CFG, force=True))
    assert forced.tensor_parallel == 1 and "waits pending" in forced.explanation


def test_declared_memory_alone_is_checked_against_the_gpus() -> None:
    p = profile("Qwen2.5-7B-Instruct")
    s = sized(size(spec(gpu_memory_mib=40000), p, DGX, CFG))
    assert (s.tensor_parallel, s.gpus_per_replica, s.gpu_memory_mib) == (1, 1, 40000)
    assert s.explanation.startswith("declared 40000 MiB per GPU (the estimate at tensor-parallel 1: ")
    result = size(spec(gpu_memory_mib=100000), p, DGX, CFG)
    assert isinstance(result, Refusal) and "needs 97.7 GiB on each of 1 GPU(s)" in result.reason


def test_an_unprofiled_model_keeps_its_declarations() -> None:
    s = sized(size(spec(gpus_per_replica=1), None, DGX, CFG, default_max_model_len=2048))
    assert (s.gpus_per_replica, s.gpu_memory_mib, s.max_model_len) == (1, 0, 2048)
    assert "no memory estimate" in s.explanation


def test_kv_cache_dtype_from_engine_args_and_concurrency_from_config() -> None:
    p = profile("Llama-3.1-8B-Instruct")
    plain = sized(size(spec(), p, DGX, CFG))
    fp8 = sized(size(spec(engine_args=("--kv-cache-dtype", "fp8")), p, DGX, CFG))
    assert fp8.estimate and plain.estimate and fp8.estimate.kv_bytes * 2 == plain.estimate.kv_bytes
    busy = sized(size(spec(max_model_len=8192), p, DGX, replace(CFG, kv_concurrency=8)))
    assert busy.estimate and busy.estimate.kv_bytes == 8 * 8192 * 128 * 1024


def test_models_config_is_validated() -> None:
    assert parse_config({}, {}).models.kv_concurrency == 1
    with pytest.raises(ValidationError, match=r"models\.kv_concurrency"):
        parse_config({"models": {"kv_concurrency": 0}}, {})
    with pytest.raises(ValidationError, match=r"models\.read_timeout_s"):
        parse_config({"models": {"read_timeout_s": 0}}, {})
    assert parse_config({}, {"NEBULA_MODELS_KV_CONCURRENCY": "4"}).models.kv_concurrency == 4


GPU_SIZES = st.sampled_from([8192, 16384, 23034, 46068, 81559, 143771])


@given(weights_gib=st.integers(1, 800), layers=st.integers(1, 128), kv=st.sampled_from([1, 2, 4, 8, 16, 64]),
       length=st.integers(1, 131072),
       fleet=st.lists(st.lists(GPU_SIZES, min_size=0, max_size=8), min_size=1, max_size=4))
def test_chosen_tensor_parallel_is_a_minimal_fitting_power_of_two(weights_gib: int, layers: int, kv: int,
                                                                   length: int, fleet: list[list[int]]) -> None:
    p = ModelProfile(weight_bytes=weights_gib << 30, layers=layers, kv_heads=kv, head_dim=128, dtype="bfloat16",
                     max_positions=131072)
    nodes = [node(f"n{i}", *gpus) for i, gpus in enumerate(fleet)]
    result = size(spec(max_model_len=length), p, nodes, CFG)
    if not any(n.gpus for n in nodes):
        assert isinstance(result, Sizing) and result.gpus_per_replica == 0
        return
    caps = [[g.memory_total_mib - DEFAULT_RESERVE_MIB for g in n.gpus] for n in nodes]

    def fits(tp: int) -> bool:
        need = estimate(p, length, tp, overhead_mib=CFG.activation_overhead_mib).total_mib
        return any(sum(c >= need for c in node_caps) >= tp for node_caps in caps)

    candidates = [tp for tp in (1, 2, 4, 8) if (kv % tp == 0 if kv >= tp else tp % kv == 0)]
    if isinstance(result, Refusal):
        assert not any(fits(tp) for tp in candidates)
        return
    tp = result.tensor_parallel
    assert tp & (tp - 1) == 0 and tp in candidates and fits(tp)
    assert not any(fits(smaller) for smaller in candidates if smaller < tp)
    assert result.gpus_per_replica == tp and result.gpu_memory_mib == estimate(p, length, tp).total_mib
