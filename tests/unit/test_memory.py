"""GPU memory estimates of real models (tests/fixtures/model-configs, README there names each published figure)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nebula.core import model_facts as mf
from nebula.core.families import Families
from nebula.core.memory import GIB, estimate, kv_bytes_per_token
from nebula.core.profile import ModelProfile
from nebula.errors import ValidationError
from tests.harness import safetensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model-configs"
GB = 10**9


def profile(name: str, headers: dict[str, mf.WeightSummary] | None = None) -> ModelProfile:
    root = FIXTURES / name
    raw = {p.name: p.read_bytes() for p in root.iterdir() if p.name in mf.SMALL_FILES}
    return mf.derive_profile(mf.read_files(raw, headers=headers), Families(), name)


def summary(tensors: dict[str, tuple[str, list[int]]]) -> mf.WeightSummary:
    data = safetensors.header(tensors)
    return mf.parse_header("model.safetensors", data[8:])


def awq_tensors(config: dict[str, int]) -> Iterator[tuple[str, tuple[str, list[int]]]]:
    """Qwen2.5 in AutoAWQ's GEMM layout: int4 packed 8 per int32, float16 scales and packed zeros per group."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    yield "model.embed_tokens.weight", ("F16", [vocab, h])
    yield "lm_head.weight", ("F16", [vocab, h])
    yield "model.norm.weight", ("F16", [h])
    for i in range(config["num_hidden_layers"]):
        for name, (fan_in, out, bias) in {"q": (h, h, True), "k": (h, kv, True), "v": (h, kv, True), "o": (h, h, False),
                                          "gate": (h, inter, False), "up": (h, inter, False),
                                          "down": (inter, h, False)}.items():
            p = f"model.layers.{i}.{name}"
            yield f"{p}.qweight", ("I32", [fan_in, out // 8])
            yield f"{p}.qzeros", ("I32", [fan_in // 128, out // 8])
            yield f"{p}.scales", ("F16", [fan_in // 128, out])
            if bias:
                yield f"{p}.bias", ("F16", [out])
        yield f"model.layers.{i}.input_layernorm.weight", ("F16", [h])
        yield f"model.layers.{i}.post_attention_layernorm.weight", ("F16", [h])


def xlmr_tensors(config: dict[str, int]) -> Iterator[tuple[str, tuple[str, list[int]]]]:
    """XLMRobertaModel's tensors (embeddings, 24 encoder layers, pooler) in float32, as bge-m3 ships them."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    yield "embeddings.word_embeddings.weight", ("F32", [config["vocab_size"], h])
    yield "embeddings.position_embeddings.weight", ("F32", [config["max_position_embeddings"], h])
    yield "embeddings.token_type_embeddings.weight", ("F32", [config["type_vocab_size"], h])
    for part in ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias", "pooler.dense.bias"):
        yield part, ("F32", [h])
    yield "pooler.dense.weight", ("F32", [h, h])
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name, shape in {"attention.self.query": [h, h], "attention.self.key": [h, h],
                            "attention.self.value": [h, h], "attention.output.dense": [h, h],
                            "intermediate.dense": [inter, h], "output.dense": [h, inter]}.items():
            yield f"{p}.{name}.weight", ("F32", shape)
            yield f"{p}.{name}.bias", ("F32", [shape[0]])
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            yield f"{p}.{ln}.weight", ("F32", [h])
            yield f"{p}.{ln}.bias", ("F32", [h])


def within(value: float, published: float, tolerance: float) -> bool:
    return abs(value - published) <= tolerance * published


def test_qwen25_7b_bf16_weights_and_kv_cache() -> None:
    p = profile("Qwen2.5-7B-Instruct")
    est = estimate(p, 32768)
    assert est.weight_bytes == 15231233024  # 15.23 GB as published, 14.2 GiB
    assert est.kv_bytes_per_token == 56 * 1024  # 28 layers x 2 x 4 KV heads x 128 x 2 bytes
    assert est.kv_bytes == 1.75 * GIB
    assert 17.5 * GIB < est.total_bytes < 18.5 * GIB
    assert est.explain() == ("at tensor-parallel 1: weights 14.2 GiB + KV cache 1.8 GiB (32768 tokens x 1 sequence "
                             "x 56 KiB/token) + overhead 2.0 GiB = 17.9 GiB per GPU")


def test_llama31_8b_matches_vllm_and_the_published_kv_cache() -> None:
    p = profile("Llama-3.1-8B-Instruct")
    est = estimate(p, 128000)
    assert within(est.weight_bytes / GIB, 14.99, 0.005)  # vLLM: "Loading model weights took 14.99 GB" (GiB)
    assert within(est.kv_bytes / GIB, 15.62, 0.001)  # HF's Llama 3.1 post: 15.62 GiB for 128k tokens in 16 bits
    assert est.total_bytes > 24 * GB  # a 24 GB GPU cannot hold the full context ...
    assert estimate(p, 8192).total_bytes < 22 * GIB  # ... but holds 8k


def test_llama31_70b_needs_several_80gb_gpus() -> None:
    p = profile("Llama-3.1-70B-Instruct")
    assert within(p.weight_bytes, 140 * GB, 0.01)  # published: 140 GB in BF16
    full = estimate(p, 128000)
    assert within(full.kv_bytes / GIB, 39.06, 0.001)  # published: 39.06 GiB at 128k tokens
    assert estimate(p, 8192, tensor_parallel=1).total_bytes > 80 * GB
    assert estimate(p, 8192, tensor_parallel=2).total_bytes < 78 * GIB  # 2 x 80 GB at short context
    assert estimate(p, 131072, tensor_parallel=2).total_bytes > 80 * GB  # the full context needs 4
    at4 = estimate(p, 131072, tensor_parallel=4)
    assert at4.total_bytes < 50 * GIB and at4.kv_bytes_per_token == 2 * 80 * 2 * 128 * 2


def test_mixtral_needs_two_80gb_gpus() -> None:
    p = profile("Mixtral-8x7B-Instruct-v0.1")
    assert within(p.weight_bytes, 46.7e9 * 2, 0.01)  # 46.7B parameters in BF16
    assert estimate(p, 32768).total_bytes > 80 * GB
    assert estimate(p, 32768, tensor_parallel=2).total_bytes < 50 * GIB


def test_fp8_checkpoint_halves_the_weights() -> None:
    p = profile("Meta-Llama-3-8B-Instruct-FP8")
    est = estimate(p, 8192)
    assert within(est.weight_bytes / GIB, 8.4596, 0.002)  # vLLM's log for this checkpoint
    assert est.kv_bytes_per_token == 128 * 1024  # KV stays 16-bit unless --kv-cache-dtype fp8
    assert est.total_bytes < 15 * GIB  # fits a 16 GB GPU, where the BF16 model does not
    assert estimate(profile("Llama-3.1-8B-Instruct"), 8192).total_bytes > 16 * GB
    assert estimate(p, 8192, kv_cache_dtype="fp8").kv_bytes == est.kv_bytes // 2


def test_awq_int4_weights_from_headers() -> None:
    config = json.loads((FIXTURES / "Qwen2.5-7B-Instruct-AWQ" / "config.json").read_text())
    p = profile("Qwen2.5-7B-Instruct-AWQ", {"model.safetensors": summary(dict(awq_tensors(config)))})
    assert p.quantization == "awq" and p.derived["weight_bytes"] == "safetensors headers of 1 file"
    assert within(p.weight_bytes, 5.5 * GB, 0.05)  # published: ~5.5 GB download
    est = estimate(p, 32768)
    assert est.kv_bytes_per_token == 56 * 1024  # AWQ quantizes weights, not the KV cache
    assert est.total_bytes < 10 * GIB


def test_bge_m3_has_no_kv_cache() -> None:
    config = json.loads((FIXTURES / "bge-m3" / "config.json").read_text())
    p = profile("bge-m3", {"model.safetensors": summary(dict(xlmr_tensors(config)))})
    assert within(p.param_count, 568e6, 0.005) and within(p.weight_bytes, 2.27 * GB, 0.01)  # published
    est = estimate(p, 8192)
    assert est.kv_bytes == 0 and "encoder-only" in est.explain()
    assert est.total_bytes < 4.2 * GIB


def test_kv_heads_are_replicated_when_fewer_than_gpus() -> None:
    p = profile("Qwen2.5-7B-Instruct")  # 4 KV heads
    per_gpu = [kv_bytes_per_token(p, tp)[0] for tp in (1, 2, 4, 8)]
    assert per_gpu == [57344, 28672, 14336, 14336]


def test_mla_latent_is_not_split() -> None:
    p = ModelProfile(layers=61, kv_heads=1, head_dim=576, dtype="bfloat16", weight_bytes=1,
                     derived={mf.ATTENTION_KEY: "mla: ..."})
    assert kv_bytes_per_token(p, 1)[0] == kv_bytes_per_token(p, 8)[0] == 61 * 576 * 2


def test_missing_facts_are_a_validation_error() -> None:
    p = profile("Qwen2.5-7B-Instruct")
    with pytest.raises(ValidationError, match="gpu_memory_mib"):
        estimate(replace(p, weight_bytes=0), 1024)
    with pytest.raises(ValidationError, match="gpu_memory_mib"):
        estimate(replace(p, layers=0), 1024)
    with pytest.raises(ValidationError):
        estimate(p, 1024, kv_cache_dtype="fp4")
    with pytest.raises(ValidationError):
        estimate(p, 0)
