"""A model's profile: what Nebula read from the model's own files, and what it derived from that.

The value type only (its JSON form travels inside the model spec in etcd, so it is parsed as strictly as the
rest of the spec). Reading the files and deriving a profile is `nebula.core.model_facts`; the memory a
replica needs is `nebula.core.memory`; the family settings (tool-call and reasoning parsers, chat-template
quirks) come from the profiles file, `nebula.core.families`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nebula.errors import ValidationError

PARSER_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ModelProfile:
    architecture: str = ""
    """config.json's first `architectures` entry, e.g. Qwen2ForCausalLM."""
    model_type: str = ""
    task: str = ""
    """generate, embed or rerank as detected from the architecture and sentence-transformers files."""
    max_positions: int = 0
    """The most tokens the model takes (core/model_limits.py); 0: its files do not say."""
    dtype: str = ""
    """Weights' dtype (torch_dtype / dtype in config.json, or the safetensors headers)."""
    quantization: str = ""
    """quantization_config.quant_method (awq, gptq, fp8, ...); empty for none."""
    param_count: int = 0
    weight_bytes: int = 0
    """Bytes of the weights on disk (safetensors index total_size or the headers), what the GPUs must hold."""
    layers: int = 0
    hidden_size: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    family: str = ""
    """The profiles-file entry that matched (e.g. qwen2.5), empty when none did."""
    tool_call_parser: str = ""
    reasoning_parser: str = ""
    engine_args: tuple[str, ...] = ()
    """Flags the family needs (parsers, chat-template quirks), before the spec's own engine_args."""
    derived: Mapping[str, str] = field(default_factory=dict)
    """For people: each derived field and what it was derived from."""

    @staticmethod
    def from_dict(obj: object) -> ModelProfile:
        if not isinstance(obj, dict):
            raise ValidationError("profile", "must be a JSON object")
        args = obj.get("engine_args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValidationError("profile.engine_args", "must be a list of strings")
        derived = obj.get("derived", {})
        if not isinstance(derived, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in derived.items()):
            raise ValidationError("profile.derived", "must map strings to strings")
        return ModelProfile(
            architecture=_str(obj, "architecture"), model_type=_str(obj, "model_type"), task=_str(obj, "task"),
            max_positions=_int(obj, "max_positions"), dtype=_str(obj, "dtype"),
            quantization=_str(obj, "quantization"), param_count=_int(obj, "param_count"),
            weight_bytes=_int(obj, "weight_bytes"), layers=_int(obj, "layers"), hidden_size=_int(obj, "hidden_size"),
            kv_heads=_int(obj, "kv_heads"), head_dim=_int(obj, "head_dim"), family=_str(obj, "family"),
            tool_call_parser=_parser(obj, "tool_call_parser"), reasoning_parser=_parser(obj, "reasoning_parser"),
            engine_args=tuple(args), derived=dict(derived))

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "model_type": self.model_type, "task": self.task,
                "max_positions": self.max_positions, "dtype": self.dtype, "quantization": self.quantization,
                "param_count": self.param_count, "weight_bytes": self.weight_bytes, "layers": self.layers,
                "hidden_size": self.hidden_size, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "family": self.family, "tool_call_parser": self.tool_call_parser,
                "reasoning_parser": self.reasoning_parser, "engine_args": list(self.engine_args),
                "derived": dict(self.derived)}

    def family_args(self) -> tuple[str, ...]:
        """The `vllm serve` flags this profile adds, as one argv element each (`--flag=value`)."""
        args: list[str] = []
        if self.tool_call_parser:
            args += ["--enable-auto-tool-choice", f"--tool-call-parser={self.tool_call_parser}"]
        if self.reasoning_parser:
            args.append(f"--reasoning-parser={self.reasoning_parser}")
        return (*args, *self.engine_args)


def _int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise ValidationError(f"profile.{key}", "must be a non-negative integer")
    return value


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > 200:
        raise ValidationError(f"profile.{key}", "must be a string of at most 200 characters")
    return value


def _parser(obj: Mapping[str, Any], key: str) -> str:
    value = _str(obj, key)
    if value and not PARSER_RE.fullmatch(value):
        raise ValidationError(f"profile.{key}", "must be a parser name (lowercase letters, digits, '_', '.', '-')")
    return value
