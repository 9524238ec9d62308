"""How long a sequence a model can take, from its own config files, and the engine's --max-model-len.

Pure: the caller reads config.json (and tokenizer_config.json, sentence_bert_config.json when present) and
passes the parsed JSON. The rules follow vLLM's own derivation (vllm/config/model.py,
`_get_and_verify_max_len`): the smallest of the length keys of the (text) config, capped by the tokenizer's
`model_max_length`, replaced by sentence-transformers' `max_seq_length`. vLLM refuses a --max-model-len above
that, so forcing a config default (2048) onto a 512-position BERT made the engine fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nebula.errors import ValidationError

# vLLM's list of keys (model_arch_config_convertor.derive_max_model_len_and_key), in its order.
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoBERTa-family position ids start at pad_token_id + 1 (vLLM's roberta.py adds padding_idx + 1), so a
# config's 514 (or bge-m3's 8194) positions hold 512 (8192) tokens. vLLM itself relies on the tokenizer's
# model_max_length for the cap; subtracting here keeps the limit right when a tokenizer config lacks it.
POSITION_OFFSET_TYPES = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"})
# RoPE scalings whose factor vLLM multiplies into the length (the others are already scaled in the config).
_UNSCALED_ROPE = frozenset({"default", "su", "longrope", "llama3", "yarn", "deepseek_yarn",
                            "deepseek_llama_scaling"})


@dataclass(frozen=True)
class ModelLimit:
    tokens: int
    source: str
    """What set it, for messages: e.g. `max_position_embeddings=512 in config.json`."""


def model_limit(config: Mapping[str, Any], tokenizer_config: Mapping[str, Any] | None = None,
                sentence_config: Mapping[str, Any] | None = None) -> ModelLimit | None:
    """The most tokens the model takes, or None when its configs do not say (vLLM then assumes 2048)."""
    text = config.get("text_config")
    text_config: Mapping[str, Any] = text if isinstance(text, Mapping) else config
    best: ModelLimit | None = None
    for key in LENGTH_KEYS:
        value = _positive_int(text_config.get(key))
        if value is not None and (best is None or value < best.tokens):
            best = ModelLimit(value, f"{key}={value} in config.json")
    if best is not None:
        best = _scaled(_offset(best, text_config), text_config)
    if tokenizer_config is not None:
        value = _positive_int(tokenizer_config.get("model_max_length"))
        if value is not None and (best is None or value < best.tokens):
            best = ModelLimit(value, f"model_max_length={value} in tokenizer_config.json")
    if sentence_config is not None:
        value = _positive_int(sentence_config.get("max_seq_length"))
        if value is not None:
            best = ModelLimit(value, f"max_seq_length={value} in sentence_bert_config.json")
    return best


def engine_max_model_len(requested: int | None, default: int, limit: ModelLimit | None) -> int | None:
    """The engine's --max-model-len: the spec's value (else the config default, 0: none) capped by the model's
    own limit; None leaves it to vLLM. A spec asking for more than the model holds is refused in one line."""
    if requested is not None and limit is not None and requested > limit.tokens:
        raise ValidationError("max_model_len", f"max_model_len {requested} is more than the model takes "
                              f"({limit.tokens}: {limit.source}); load it with --max-model-len {limit.tokens} "
                              "or less")
    wanted = requested or default or None
    if limit is None:
        return wanted
    return limit.tokens if wanted is None else min(wanted, limit.tokens)


def _offset(limit: ModelLimit, config: Mapping[str, Any]) -> ModelLimit:
    pad = config.get("pad_token_id")
    if (config.get("model_type") not in POSITION_OFFSET_TYPES or not isinstance(pad, int)
            or not limit.source.startswith("max_position_embeddings")):
        return limit
    tokens = limit.tokens - pad - 1
    return ModelLimit(tokens, f"{limit.source} less pad_token_id+1={pad + 1}") if tokens > 0 else limit


def _scaled(limit: ModelLimit, config: Mapping[str, Any]) -> ModelLimit:
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    if not isinstance(rope, Mapping):
        return limit
    kind = rope.get("rope_type", rope.get("type", "default"))
    factor = rope.get("factor")
    if kind in _UNSCALED_ROPE or not isinstance(factor, int | float) or factor <= 1:
        return limit
    return ModelLimit(int(limit.tokens * factor), f"{limit.source} scaled by rope factor {factor}")


def _positive_int(value: object) -> int | None:
    # Tokenizers without a real limit write 1e30 (VERY_LARGE_INTEGER): as a float, it is not a limit.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value >= 10**9:
        return None
    return value
