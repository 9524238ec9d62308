"""Model facts: parsing a model's small files and safetensors headers, and the profile derived from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.core import model_facts as mf
from nebula.core.families import Families, FamilyRule
from nebula.core.profile import ModelProfile
from nebula.errors import ValidationError
from tests.harness import safetensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model-configs"
FAMILIES = Families((
    FamilyRule("qwen2.5", model_types=("qwen2",), tool_call_parser="hermes"),
    FamilyRule("llama3", model_types=("llama",), sources=("*llama-3.1*",), tool_call_parser="llama3_json"),
    FamilyRule("deepseek-v3", model_types=("deepseek_v3",), tool_call_parser="deepseek_v3"),
))


def fixture_files(name: str) -> mf.ModelFiles:
    root = FIXTURES / name
    raw = {p.name: p.read_bytes() for p in root.iterdir() if p.name in mf.SMALL_FILES}
    return mf.read_files(raw)


def files_of(config: dict[str, Any], **raw: bytes) -> mf.ModelFiles:
    return mf.read_files({"config.json": json.dumps(config).encode(), **raw})


def test_qwen25_profile_is_read_from_its_files_with_provenance() -> None:
    p = mf.derive_profile(fixture_files("Qwen2.5-7B-Instruct"), FAMILIES, "Qwen/Qwen2.5-7B-Instruct")
    assert (p.architecture, p.model_type, p.task) == ("Qwen2ForCausalLM", "qwen2", "generate")
    assert (p.max_positions, p.dtype, p.quantization) == (32768, "bfloat16", "")
    assert (p.layers, p.hidden_size, p.kv_heads, p.head_dim) == (28, 3584, 4, 128)
    assert p.weight_bytes == 15231233024 and p.param_count == 0  # the index names no parameter count
    assert (p.family, p.tool_call_parser) == ("qwen2.5", "hermes")
    assert p.derived["weight_bytes"] == "metadata.total_size in model.safetensors.index.json"
    assert p.derived["head_dim"] == "hidden_size / num_attention_heads in config.json"
    assert p.derived["max_positions"].startswith("max_position_embeddings=32768")
    assert "qwen2.5" in p.derived["family"]


def test_llama_70b_keeps_its_own_length_and_matches_its_family_by_source() -> None:
    p = mf.derive_profile(fixture_files("Llama-3.1-70B-Instruct"), FAMILIES, "meta-llama/Llama-3.1-70B-Instruct")
    assert (p.layers, p.kv_heads, p.head_dim, p.max_positions) == (80, 8, 128, 131072)
    assert p.family == "llama3"
    other = mf.derive_profile(fixture_files("Llama-3.1-70B-Instruct"), FAMILIES, "/models/llama-2-70b")
    assert other.family == "" and other.tool_call_parser == ""


@pytest.mark.parametrize(("name", "method", "dtype"), [("Meta-Llama-3-8B-Instruct-FP8", "fp8", "bfloat16"),
                                                       ("Qwen2.5-7B-Instruct-AWQ", "awq", "float16")])
def test_quantization_method_is_read(name: str, method: str, dtype: str) -> None:
    p = mf.derive_profile(fixture_files(name), FAMILIES, name)
    assert (p.quantization, p.dtype) == (method, dtype)


def test_compressed_tensors_and_old_compression_config() -> None:
    p = mf.derive_profile(files_of({"architectures": ["LlamaForCausalLM"], "quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized"}}), FAMILIES, "x")
    assert p.quantization == "compressed-tensors"
    old = mf.derive_profile(files_of({"architectures": ["LlamaForCausalLM"], "compression_config": {
        "format": "pack-quantized"}}), FAMILIES, "x")
    assert old.quantization == "compressed-tensors"


def test_whisper_is_a_transcribe_model_whose_cache_is_its_decoders() -> None:
    p = mf.derive_profile(fixture_files("whisper-large-v3"), FAMILIES, "openai/whisper-large-v3")
    assert (p.architecture, p.task, p.max_positions, p.dtype) == ("WhisperForConditionalGeneration", "transcribe",
                                                                  448, "float16")
    assert (p.layers, p.kv_heads, p.head_dim) == (32, 20, 64)
    # The tiny test Whisper's config has no num_hidden_layers: its decoder's layers are read instead.
    tiny = mf.derive_profile(files_of({"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
                                       "d_model": 64, "decoder_layers": 2, "encoder_layers": 2,
                                       "decoder_attention_heads": 2, "max_target_positions": 448}), FAMILIES, "x")
    assert (tiny.layers, tiny.kv_heads, tiny.head_dim) == (2, 2, 32)
    assert tiny.derived["layers"] == "decoder_layers in config.json"


def test_bge_m3_is_an_embedding_model_by_its_sentence_transformers_files() -> None:
    p = mf.derive_profile(fixture_files("bge-m3"), FAMILIES, "BAAI/bge-m3")
    assert (p.architecture, p.task, p.max_positions) == ("XLMRobertaModel", "embed", 8192)
    assert p.derived["task"] == "sentence-transformers modules.json with a Pooling module"
    assert (p.kv_heads, p.head_dim) == (16, 64)


def test_cross_encoder_with_one_label_reranks() -> None:
    p = mf.derive_profile(fixture_files("ms-marco-MiniLM-L-6-v2"), FAMILIES, "cross-encoder/ms-marco-MiniLM-L-6-v2")
    assert (p.architecture, p.task, p.max_positions) == ("BertForSequenceClassification", "rerank", 512)


@pytest.mark.parametrize(("arch", "extra", "task"), [
    ("MistralForCausalLM", {}, "generate"),
    ("Gemma3ForConditionalGeneration", {}, "generate"),
    ("WhisperForConditionalGeneration", {}, "transcribe"),
    ("GPT2LMHeadModel", {}, "generate"),
    ("BertModel", {}, "embed"),
    ("Qwen3EmbeddingModel", {}, "embed"),
    ("XLMRobertaForSequenceClassification", {"id2label": {"0": "LABEL_0"}}, "rerank"),
    ("BertForSequenceClassification", {"num_labels": 3}, "classify"),
    ("SomethingElse", {}, ""),
])
def test_task_follows_vllms_architecture_suffixes(arch: str, extra: dict[str, Any], task: str) -> None:
    assert mf.derive_profile(files_of({"architectures": [arch], **extra}), FAMILIES, "x").task == task


def test_multimodal_model_reads_its_text_config() -> None:
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"hidden_size": 5376, "num_attention_heads": 32, "num_hidden_layers": 62,
                              "num_key_value_heads": 16, "head_dim": 128, "max_position_embeddings": 131072,
                              "torch_dtype": "bfloat16"}}
    p = mf.derive_profile(files_of(config), FAMILIES, "google/gemma-3-27b-it")
    assert (p.layers, p.hidden_size, p.kv_heads, p.head_dim, p.max_positions) == (62, 5376, 16, 128, 131072)
    assert p.dtype == "bfloat16" and p.derived["dtype"] == "torch_dtype in text_config in config.json"


def test_deepseek_v3_mla_caches_one_latent() -> None:
    # DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3): MLA with kv_lora_rank 512, qk_rope_head_dim 64.
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
              "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 61,
              "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
              "max_position_embeddings": 163840, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    p = mf.derive_profile(files_of(config), FAMILIES, "deepseek-ai/DeepSeek-V3")
    assert (p.kv_heads, p.head_dim, p.layers) == (1, 576, 61)
    assert mf.is_mla(p) and p.family == "deepseek-v3" and p.quantization == "fp8"


def test_safetensors_headers_give_bytes_and_elements_per_dtype() -> None:
    data = safetensors.header({"a": ("BF16", [4, 8]), "b": ("F32", [3]), "q": ("I32", [2, 2])})
    size = mf.header_length("model.safetensors", data[:8])
    summary = mf.parse_header("model.safetensors", data[8:8 + size])
    assert summary.total_bytes == 4 * 8 * 2 + 3 * 4 + 4 * 4
    assert dict(summary.params) == {"BF16": 32, "F32": 3, "I32": 4}
    both = mf.combine({"x": summary, "y": summary})
    assert both.total_bytes == 2 * summary.total_bytes and both.param_count == 78
    files = mf.read_files({"config.json": b'{"architectures": ["LlamaForCausalLM"]}'}, headers={"x": summary})
    p = mf.derive_profile(files, FAMILIES, "x")
    assert p.param_count == 39 and p.dtype == "bfloat16"
    assert p.derived["dtype"] == "most elements are BF16 in the safetensors headers of 1 file"


def test_index_total_parameters_is_used_when_present() -> None:
    index = {"metadata": {"total_size": 1000, "total_parameters": 500}, "weight_map": {"w": "a.safetensors"}}
    files = files_of({"architectures": ["LlamaForCausalLM"]},
                     **{"model.safetensors.index.json": json.dumps(index).encode()})
    assert files.weights is not None and (files.weights.total_bytes, files.weights.param_count) == (1000, 500)


def test_chat_template_is_noticed_in_either_place() -> None:
    assert mf.read_files({"config.json": b"{}"}, frozenset({"chat_template.jinja"})).chat_template
    tok = json.dumps({"chat_template": "{{ messages }}"}).encode()
    assert mf.read_files({"config.json": b"{}", "tokenizer_config.json": tok}).chat_template
    assert not mf.read_files({"config.json": b"{}"}).chat_template


@pytest.mark.parametrize(("raw", "field"), [
    ({}, "config.json"),
    ({"config.json": b"[1, 2]"}, "config.json"),
    ({"config.json": b"\xff\xfe"}, "config.json"),
    ({"config.json": b"{}", "modules.json": b"{}"}, "modules.json"),
    ({"config.json": b"{}", "model.safetensors.index.json": b'{"metadata": {"total_size": -1}}'},
     "model.safetensors.index.json"),
    ({"config.json": b"{}", "model.safetensors.index.json": b'{"weight_map": {"a": 1}}'},
     "model.safetensors.index.json"),
])
def test_malformed_files_are_refused_naming_the_file(raw: dict[str, bytes], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        mf.read_files(raw)
    assert e.value.field == field


@pytest.mark.parametrize("header", [
    b'{"a": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 0]}}',
    b'{"a": {"dtype": "BF16", "shape": [-1], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "bf 16", "shape": [2], "data_offsets": [0, 4]}}',
    b'{"a": [1]}',
    b'{"a": {"dtype": "BF16", "shape": [4611686018427387904, 4], "data_offsets": [0, 4]}}',
])
def test_malformed_headers_are_refused(header: bytes) -> None:
    with pytest.raises(ValidationError):
        mf.parse_header("model.safetensors", header)


def test_header_length_is_bounded() -> None:
    with pytest.raises(ValidationError):
        mf.header_length("x", (1 << 40).to_bytes(8, "little"))
    with pytest.raises(ValidationError):
        mf.header_length("x", b"\x01")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
                    max_leaves=20)
KEYS = st.sampled_from(["architectures", "model_type", "text_config", "num_hidden_layers", "hidden_size",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "kv_lora_rank", "qk_rope_head_dim",
                        "torch_dtype", "dtype", "quantization_config", "compression_config", "num_labels", "id2label",
                        "max_position_embeddings", "rope_scaling", "pad_token_id"])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.dictionaries(KEYS, JSON, max_size=8), modules=st.binary(max_size=40) | JSON.map(
    lambda v: json.dumps(v).encode()), index=JSON.map(lambda v: json.dumps(v).encode()))
def test_any_garbage_gives_a_profile_or_a_validation_error(config: dict[str, Any], modules: bytes,
                                                           index: bytes) -> None:
    raw = {"config.json": json.dumps(config).encode(), "modules.json": modules,
           "model.safetensors.index.json": index}
    try:
        files = mf.read_files(raw)
        profile = mf.derive_profile(files, FAMILIES, "x/y")
    except ValidationError:
        return
    assert ModelProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


@given(data=st.binary(max_size=200))
def test_any_header_bytes_give_a_summary_or_a_validation_error(data: bytes) -> None:
    try:
        assert 2 <= mf.header_length("x", data) <= mf.MAX_HEADER_BYTES
    except ValidationError:
        pass
    try:
        summary = mf.parse_header("x", data)
    except ValidationError:
        return
    assert summary.total_bytes >= 0 and all(n >= 0 for n in summary.params.values())
