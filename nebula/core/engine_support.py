"""What the engine Nebula runs (vLLM 0.32) can serve, checked before a load is stored.

A model the engine cannot load would otherwise be stored, placed, downloaded and started, only to fail on
its node minutes later: the admin API refuses it up front, naming the fix.
"""

from __future__ import annotations

from nebula.core.profile import ModelProfile
from nebula.errors import ValidationError

# quantization_config.quant_method values vLLM 0.32 loads (vllm/model_executor/layers/quantization/__init__.py,
# QUANTIZATION_METHODS, with the spellings model configs use): bitsandbytes, GGUF, HQQ, EETQ, AQLM and ExLlamaV2
# checkpoints are not among them in this release.
VLLM_QUANTIZATIONS = frozenset({
    "awq", "auto_awq", "awq_marlin", "gptq", "auto_gptq", "gptq_marlin", "fp8", "fbgemm_fp8", "fp_quant",
    "modelopt", "modelopt_fp4", "modelopt_mxfp8", "modelopt_mixed", "humming", "compressed-tensors",
    "compressed_tensors", "experts_int8", "quark", "moe_wna16", "torchao", "inc", "auto-round", "mxfp4",
    "gpt_oss_mxfp4", "deepseek_v4_fp8",
})


def check_quantization(profile: ModelProfile) -> None:
    """ValidationError when the model's weights are quantized in a way the engine does not load."""
    method = profile.quantization.lower()
    if method and method not in VLLM_QUANTIZATIONS:
        raise ValidationError("source", f"the model is quantized with '{profile.quantization}' "
                              f"({profile.derived.get('quantization', 'quantization_config in config.json')}), which "
                              "vLLM 0.32 does not load; use an AWQ, GPTQ, FP8 or unquantized variant of the model "
                              "(nebula catalog search NAME)")
