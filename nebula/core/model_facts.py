"""A model's facts, read from its own small files, and the profile derived from them.

Pure: the adapter (nebula/adapters/model_files.py) fetches the bytes of the files named in `SMALL_FILES` and
of each safetensors file's header (never the weights), `read_files` parses them into `ModelFiles`, and
`derive_profile` turns that into a `ModelProfile`, saying for each field what it came from. Anything
malformed raises ValidationError naming the file: model repositories are input like any other.

A safetensors file starts with an 8-byte little-endian header length, then a JSON header mapping each
tensor to its dtype, shape and data_offsets (plus an optional `__metadata__`). Summing the headers gives
the exact bytes and element counts; `model.safetensors.index.json`'s `metadata.total_size` gives the bytes
when the headers were not read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nebula.core.families import Families
from nebula.core.model_limits import model_limit
from nebula.core.profile import ModelProfile
from nebula.errors import ValidationError

CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
SENTENCE_BERT_CONFIG = "sentence_bert_config.json"
SENTENCE_MODULES = "modules.json"
SENTENCE_CONFIG = "config_sentence_transformers.json"
CHAT_TEMPLATE = "chat_template.jinja"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
PYTORCH_SINGLE = "pytorch_model.bin"
"""Older checkpoints (bge-m3 among them) ship pickled weights: their size, not their contents, is used."""
SMALL_FILES = (CONFIG, TOKENIZER_CONFIG, GENERATION_CONFIG, SENTENCE_BERT_CONFIG, SENTENCE_MODULES,
               SENTENCE_CONFIG, SAFETENSORS_INDEX, PYTORCH_INDEX)
PRESENCE_FILES = (CHAT_TEMPLATE,)
"""Files only whose presence matters (a chat template may be large: never read)."""
MAX_JSON_BYTES = 32 * 1024 * 1024
"""Largest small file read: tokenizer_config.json with a long chat template stays well under this."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""safetensors' own limit on a header."""
MAX_SHARDS = 4096
ATTENTION_KEY = "attention"
"""`derived` key saying the model uses MLA (one compressed latent per token): memory.py reads it."""
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "distilbert",
                           "deberta", "deberta-v2", "electra", "modernbert", "nomic_bert", "new", "mpnet"})
"""Encoder-only model types: vLLM keeps no KV cache for them (attention over the whole input at once)."""

# vLLM's architecture-suffix defaults (vllm/config/model.py, _SUFFIX_TO_DEFAULTS), first match wins.
_GENERATE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "ChatModel", "LMHeadModel")
_CLASSIFY_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ClassificationModel")
# vLLM's speech-to-text models that serve nothing but /v1/audio/* (their class says
# supports_transcription_only); they end in ForConditionalGeneration like chat models, so are named whole.
_TRANSCRIBE_ARCHS = frozenset({"WhisperForConditionalGeneration", "CohereAsrForConditionalGeneration",
                               "FireRedASR2ForConditionalGeneration", "FunASRForConditionalGeneration",
                               "MossTranscribeDiarizeForConditionalGeneration"})
_EMBED_SUFFIXES = ("ForTextEncoding", "EmbeddingModel", "ForRewardModeling", "RewardModel", "Model")
_QUANT_KEYS = ("quantization_config", "compression_config")
_DTYPE_RE = re.compile(r"[A-Z0-9_]{1,16}")
_HUGE = 1 << 60
"""Sizes at or above this are no real model (and would not fit the profile's integers)."""


@dataclass(frozen=True)
class WeightSummary:
    total_bytes: int
    params: Mapping[str, int] = field(default_factory=dict)
    """Stored elements per safetensors dtype (BF16, F8_E4M3, I32, ...); empty when only the index was read.
    Packed formats (AWQ/GPTQ int4 in I32) count stored elements, not logical parameters."""
    source: str = ""

    @property
    def param_count(self) -> int:
        return sum(self.params.values())


@dataclass(frozen=True)
class ModelFiles:
    config: Mapping[str, Any]
    tokenizer_config: Mapping[str, Any] | None = None
    generation_config: Mapping[str, Any] | None = None
    sentence_bert_config: Mapping[str, Any] | None = None
    sentence_modules: tuple[str, ...] = ()
    """modules.json's module types (sentence_transformers.models.Pooling, ...)."""
    sentence_transformers: bool = False
    """modules.json or config_sentence_transformers.json present: published as a sentence-transformers model."""
    chat_template: bool = False
    """A chat template: chat_template.jinja or tokenizer_config.json's chat_template."""
    weights: WeightSummary | None = None


def parse_json(name: str, data: bytes) -> dict[str, Any]:
    """A small file's JSON object, or ValidationError naming the file."""
    if len(data) > MAX_JSON_BYTES:
        raise ValidationError(name, f"is {len(data)} bytes, more than the {MAX_JSON_BYTES} read")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValidationError(name, f"is not JSON: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(obj, dict):
        raise ValidationError(name, "must be a JSON object")
    return obj


def header_length(name: str, first8: bytes) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes."""
    if len(first8) < 8:
        raise ValidationError(name, "is shorter than a safetensors header")
    size = int.from_bytes(first8[:8], "little")
    if not 2 <= size <= MAX_HEADER_BYTES:
        raise ValidationError(name, f"safetensors header length {size} is out of range")
    return size


def parse_header(name: str, header: bytes) -> WeightSummary:
    """One safetensors header (the JSON after the length): its tensors' bytes and elements per dtype."""
    obj = parse_json(name, header)
    total, params = 0, dict[str, int]()
    for tensor, info in obj.items():
        if tensor == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValidationError(name, f"tensor {tensor[:80]!r} must be an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or not _DTYPE_RE.fullmatch(dtype):
            raise ValidationError(name, f"tensor {tensor[:80]!r} has no dtype")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise ValidationError(name, f"tensor {tensor[:80]!r} has a bad shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets)
                or offsets[1] < offsets[0]):
            raise ValidationError(name, f"tensor {tensor[:80]!r} has bad data_offsets")
        total += offsets[1] - offsets[0]
        params[dtype] = params.get(dtype, 0) + math.prod(shape)
        if total >= _HUGE or params[dtype] >= _HUGE:
            raise ValidationError(name, f"tensor {tensor[:80]!r} is impossibly large")
    return WeightSummary(total, params, f"safetensors header of {name}")


def combine(summaries: Mapping[str, WeightSummary]) -> WeightSummary:
    """The headers of all shards, as one summary."""
    total, params = 0, dict[str, int]()
    for s in summaries.values():
        total += s.total_bytes
        for dtype, n in s.params.items():
            params[dtype] = params.get(dtype, 0) + n
    if total >= _HUGE or sum(params.values()) >= _HUGE:
        raise ValidationError("model.safetensors", "the headers add up to an impossible size")
    files = len(summaries)
    return WeightSummary(total, params, f"safetensors headers of {files} file{'s' if files != 1 else ''}")


def shard_names(index: Mapping[str, Any], name: str = SAFETENSORS_INDEX) -> tuple[str, ...]:
    """The weight files an index names (its weight_map's values), sorted."""
    weight_map = index.get("weight_map", {})
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValidationError(name, "weight_map must map tensor names to file names")
    names = sorted(set(weight_map.values()))
    if len(names) > MAX_SHARDS or any(n.startswith("/") or ".." in n.split("/") for n in names):
        raise ValidationError(name, "weight_map names too many files or a path outside the repo")
    return tuple(names)


def index_summary(index: Mapping[str, Any], name: str = SAFETENSORS_INDEX) -> WeightSummary | None:
    """metadata.total_size of an index (None when it has none)."""
    meta = index.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise ValidationError(name, "metadata must be an object")
    size = meta.get("total_size")
    if size is None:
        return None
    if isinstance(size, float) and size.is_integer():
        size = int(size)  # some converters wrote it as a float
    if not _count(size) or size == 0:
        raise ValidationError(name, "metadata.total_size must be a positive integer")
    params = meta.get("total_parameters")
    counted = {"total": params} if _count(params) and params else {}
    return WeightSummary(size, counted, f"metadata.total_size in {name}")


def read_files(raw: Mapping[str, bytes], present: frozenset[str] = frozenset(),
               headers: Mapping[str, WeightSummary] | None = None, pickled_bytes: int = 0) -> ModelFiles:
    """ModelFiles from the bytes of the small files found (`raw`, by file name), the names of other files
    that exist (`present`), the parsed safetensors headers (by file name) if read, and the size of a
    pytorch_model.bin when the model has no safetensors. The weights' size comes from the first of: the
    headers, the safetensors index, the pytorch index, the pickled file's size."""
    if CONFIG not in raw:
        raise ValidationError(CONFIG, "is missing: not a Hugging Face model directory")
    parsed = {name: parse_json(name, data) for name, data in raw.items()
              if name in SMALL_FILES and name != SENTENCE_MODULES}
    module_types: tuple[str, ...] = ()
    if SENTENCE_MODULES in raw:
        try:
            listed = json.loads(raw[SENTENCE_MODULES].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            listed = None
        if not isinstance(listed, list) or len(raw[SENTENCE_MODULES]) > MAX_JSON_BYTES:
            raise ValidationError(SENTENCE_MODULES, "must be a JSON list of modules")
        module_types = tuple(str(m.get("type", "")) for m in listed if isinstance(m, dict))
    weights: WeightSummary | None = None
    if headers:
        weights = combine(headers)
    else:
        for index in (SAFETENSORS_INDEX, PYTORCH_INDEX):
            if index in parsed and weights is None:
                shard_names(parsed[index], index)
                weights = index_summary(parsed[index], index)
        if weights is None and pickled_bytes > 0:
            weights = WeightSummary(pickled_bytes, {}, f"size of {PYTORCH_SINGLE}")
    tok = parsed.get(TOKENIZER_CONFIG)
    chat = CHAT_TEMPLATE in present or (tok is not None and bool(tok.get("chat_template")))
    return ModelFiles(config=parsed[CONFIG], tokenizer_config=tok, generation_config=parsed.get(GENERATION_CONFIG),
                      sentence_bert_config=parsed.get(SENTENCE_BERT_CONFIG), sentence_modules=module_types,
                      sentence_transformers=SENTENCE_MODULES in raw or SENTENCE_CONFIG in raw,
                      chat_template=chat, weights=weights)


def derive_profile(files: ModelFiles, families: Families, source_name: str) -> ModelProfile:
    """The profile of a model from its files; `source_name` (repo id or directory) matches family globs."""
    config = files.config
    text = _text_config(config)
    derived: dict[str, str] = {}
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    model_type = _opt_str(config, "model_type")
    task, why = _task(arch, files)
    if task:
        derived["task"] = why
    limit = model_limit(config, files.tokenizer_config, files.sentence_bert_config)
    if limit is not None:
        derived["max_positions"] = limit.source
    dtype, why = _dtype(config, text, files.weights)
    if dtype:
        derived["dtype"] = why
    quant = _quantization(config, text)
    if quant:
        derived["quantization"] = "quantization_config.quant_method in config.json"
    weights = files.weights
    if weights is not None:
        derived["weight_bytes"] = weights.source
        if weights.param_count:
            derived["param_count"] = weights.source
    # decoder_*: an encoder-decoder (Whisper) caches keys and values in its decoder's layers.
    layer_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers")
                      if _first_int(text, (k,))), "")
    layers, hidden, heads = (_first_int(text, keys) for keys in (
        (layer_key,), ("hidden_size", "d_model", "n_embd"),
        ("num_attention_heads", "n_head", "num_heads", "decoder_attention_heads")))
    kv_heads, head_dim = _kv_shape(text, hidden, heads, derived)
    if layers:
        derived["layers"] = f"{layer_key} in config.json"
    rule = families.match(model_type, arch, source_name)
    if rule is not None:
        derived["family"] = rule.why()
    return ModelProfile(
        architecture=arch[:200], model_type=model_type[:200], task=task,
        max_positions=limit.tokens if limit is not None else 0, dtype=dtype, quantization=quant,
        param_count=weights.param_count if weights is not None else 0,
        weight_bytes=weights.total_bytes if weights is not None else 0, layers=layers, hidden_size=hidden,
        kv_heads=kv_heads, head_dim=head_dim, family=rule.name if rule is not None else "",
        tool_call_parser=rule.tool_call_parser if rule is not None else "",
        reasoning_parser=rule.reasoning_parser if rule is not None else "",
        engine_args=rule.engine_args if rule is not None else (), derived=derived)


def is_mla(profile: ModelProfile) -> bool:
    return profile.derived.get(ATTENTION_KEY, "").startswith("mla")


def _task(arch: str, files: ModelFiles) -> tuple[str, str]:
    config = files.config
    if arch.endswith(_CLASSIFY_SUFFIXES):
        labels = _labels(config)
        if labels == 1:
            return "rerank", f"{arch} with num_labels 1 (a cross-encoder score)"
        return "classify", f"{arch} with {labels} labels"
    if files.sentence_transformers and any(t.endswith("Pooling") for t in files.sentence_modules):
        return "embed", "sentence-transformers modules.json with a Pooling module"
    if arch in _TRANSCRIBE_ARCHS:
        return "transcribe", f"architecture {arch} (vLLM serves it on /v1/audio/transcriptions only)"
    if arch.endswith(_GENERATE_SUFFIXES):
        return "generate", f"architecture {arch} (vLLM runs *{_suffix(arch, _GENERATE_SUFFIXES)} as generate)"
    if files.sentence_transformers:
        return "embed", "sentence-transformers files (modules.json / config_sentence_transformers.json)"
    if arch.endswith(_EMBED_SUFFIXES):
        return "embed", f"architecture {arch} (vLLM pools *{_suffix(arch, _EMBED_SUFFIXES)} as embed)"
    return "", ""


def _suffix(arch: str, suffixes: tuple[str, ...]) -> str:
    return next(s for s in suffixes if arch.endswith(s))


def _labels(config: Mapping[str, Any]) -> int:
    n = config.get("num_labels")
    if _count(n) and n:
        return int(n)
    id2label = config.get("id2label")
    return len(id2label) if isinstance(id2label, dict) and id2label else 2


def _dtype(config: Mapping[str, Any], text: Mapping[str, Any], weights: WeightSummary | None) -> tuple[str, str]:
    for obj, where in ((config, "config.json"), (text, "text_config in config.json")):
        for key in ("torch_dtype", "dtype"):
            value = obj.get(key)
            if isinstance(value, str) and value and len(value) <= 40:
                return value.removeprefix("torch."), f"{key} in {where}"
    if weights is not None and weights.params:
        top = max(weights.params.items(), key=lambda kv: kv[1])[0]
        return _SAFETENSORS_DTYPES.get(top, top.lower()), f"most elements are {top} in the {weights.source}"
    return "", ""


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _quantization(config: Mapping[str, Any], text: Mapping[str, Any]) -> str:
    for obj in (config, text):
        for key in _QUANT_KEYS:
            q = obj.get(key)
            if isinstance(q, dict):
                method = q.get("quant_method")
                if isinstance(method, str) and method:
                    return method.lower()[:40]
                if key == "compression_config":
                    return "compressed-tensors"
    return ""


def _kv_shape(text: Mapping[str, Any], hidden: int, heads: int, derived: dict[str, str]) -> tuple[int, int]:
    lora, rope = _first_int(text, ("kv_lora_rank",)), _first_int(text, ("qk_rope_head_dim",))
    if lora and rope:
        # DeepSeek V2/V3 MLA: vLLM caches one latent of kv_lora_rank + qk_rope_head_dim per token and layer,
        # the same on every tensor-parallel rank (vllm/config/model.py get_num_kv_heads returns 1 for MLA).
        derived[ATTENTION_KEY] = (f"mla: one latent of kv_lora_rank {lora} + qk_rope_head_dim {rope} per token "
                                  "and layer, not split by tensor parallelism")
        derived["kv_heads"] = derived["head_dim"] = "MLA latent (kv_lora_rank, qk_rope_head_dim in config.json)"
        return 1, lora + rope
    kv = _first_int(text, ("num_key_value_heads", "num_kv_heads", "n_head_kv"))
    if kv:
        derived["kv_heads"] = "num_key_value_heads in config.json"
    elif heads:
        kv = heads
        derived["kv_heads"] = "num_attention_heads in config.json (no num_key_value_heads: multi-head attention)"
    head_dim = _first_int(text, ("head_dim",))
    if head_dim:
        derived["head_dim"] = "head_dim in config.json"
    elif hidden and heads and hidden % heads == 0:
        head_dim = hidden // heads
        derived["head_dim"] = "hidden_size / num_attention_heads in config.json"
    return kv, head_dim


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _first_int(obj: Mapping[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 40:
            return value
    return 0


def _opt_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key, "")
    return value if isinstance(value, str) else ""


def _count(value: object) -> bool:
    """A non-negative JSON integer (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62
