"""The GPU memory one replica of a model needs, per GPU, from its profile.

Follows vLLM's own accounting (vllm/v1/worker/gpu_worker.py determine_available_memory, and the KV cache
specs in vllm/v1/kv_cache_interface.py):
- weights: the safetensors bytes, sharded evenly over the tensor-parallel GPUs (vLLM splits every linear
  layer and the vocabulary; the few replicated norms are noise);
- KV cache: per token and layer, 2 (K and V) x KV heads on this GPU x head size x the cache dtype's bytes.
  The KV heads on one GPU are max(1, kv_heads // tensor_parallel) (vllm/config/model.py get_num_kv_heads:
  heads are replicated when there are fewer than GPUs). MLA models (DeepSeek V2/V3) cache one latent of
  kv_lora_rank + qk_rope_head_dim per token and layer, with no K/V pair and the same on every GPU.
  Encoder-only pooling models (BERT, XLM-RoBERTa) keep no KV cache at all;
- overhead: the activation peak of vLLM's profiling run, CUDA graphs, and memory outside PyTorch (NCCL,
  cuBLAS workspaces). vLLM logs it per GPU at start ("PyTorch activation peak memory ... non_torch_memory
  ..."): about 1.5-2.5 GiB for 7-70B models at the default batch sizes; [models] activation_overhead_mib.
Pure arithmetic; sizing.py decides the tensor-parallel size from these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from nebula.core.model_facts import ENCODER_TYPES, is_mla
from nebula.core.profile import ModelProfile
from nebula.errors import ValidationError

GIB = 1 << 30
MIB = 1 << 20
DEFAULT_OVERHEAD_MIB = 2048
_DTYPE_BYTES = {"float32": 4, "float": 4, "float64": 8, "float16": 2, "half": 2, "bfloat16": 2,
                "float8_e4m3fn": 1, "float8_e5m2": 1}
_KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1, "bfloat16": 2,
                   "float16": 2, "half": 2, "float32": 4, "float": 4}


@dataclass(frozen=True)
class MemoryEstimate:
    tensor_parallel: int
    max_model_len: int
    concurrency: int
    weight_bytes: int
    """Per GPU."""
    kv_bytes_per_token: int
    """Per GPU, all layers."""
    kv_bytes: int
    """Per GPU: kv_bytes_per_token x max_model_len x concurrency."""
    overhead_bytes: int
    kv_note: str = ""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def total_mib(self) -> int:
        return -(-self.total_bytes // MIB)

    def explain(self) -> str:
        kv = (f"KV cache {_gib(self.kv_bytes)} ({self.max_model_len} tokens x {self.concurrency} "
              f"sequence{'s' if self.concurrency != 1 else ''} x {self.kv_bytes_per_token // 1024} KiB/token)"
              if self.kv_bytes_per_token else f"no KV cache ({self.kv_note or 'none'})")
        return (f"at tensor-parallel {self.tensor_parallel}: weights {_gib(self.weight_bytes)} + {kv} + "
                f"overhead {_gib(self.overhead_bytes)} = {_gib(self.total_bytes)} per GPU")


def estimate(profile: ModelProfile, max_model_len: int, tensor_parallel: int = 1, concurrency: int = 1,
             kv_cache_dtype: str = "auto", overhead_mib: int = DEFAULT_OVERHEAD_MIB) -> MemoryEstimate:
    """Per-GPU need of one replica; ValidationError when the profile lacks what the sum needs."""
    if tensor_parallel < 1 or max_model_len < 1 or concurrency < 1 or overhead_mib < 0:
        raise ValidationError("tensor_parallel", "tensor_parallel, max_model_len and concurrency must be at least 1")
    if profile.weight_bytes <= 0:
        raise ValidationError("profile.weight_bytes", "the model's weight size is unknown (no safetensors index or "
                              "headers were read): declare gpu_memory_mib")
    weights = -(-profile.weight_bytes // tensor_parallel)
    per_token, note = kv_bytes_per_token(profile, tensor_parallel, kv_cache_dtype)
    return MemoryEstimate(tensor_parallel=tensor_parallel, max_model_len=max_model_len, concurrency=concurrency,
                          weight_bytes=weights, kv_bytes_per_token=per_token,
                          kv_bytes=per_token * max_model_len * concurrency, overhead_bytes=overhead_mib * MIB,
                          kv_note=note)


def kv_bytes_per_token(profile: ModelProfile, tensor_parallel: int = 1,
                       kv_cache_dtype: str = "auto") -> tuple[int, str]:
    """KV cache bytes one token takes on one GPU (all layers), and why when it is none."""
    if profile.task in ("embed", "rerank", "classify") and profile.model_type in ENCODER_TYPES:
        return 0, f"{profile.model_type} is encoder-only"
    if not (profile.layers and profile.kv_heads and profile.head_dim):
        raise ValidationError("profile", "the model's layers, KV heads or head size are unknown (config.json lacks "
                              "them): declare gpu_memory_mib")
    size = _kv_dtype_bytes(profile, kv_cache_dtype)
    if is_mla(profile):
        return profile.layers * profile.head_dim * size, ""
    heads = max(1, profile.kv_heads // tensor_parallel)
    return 2 * profile.layers * heads * profile.head_dim * size, ""


def _kv_dtype_bytes(profile: ModelProfile, kv_cache_dtype: str) -> int:
    if kv_cache_dtype != "auto":
        if kv_cache_dtype not in _KV_DTYPE_BYTES:
            raise ValidationError("kv_cache_dtype", f"unknown KV cache dtype {kv_cache_dtype!r} (auto, fp8, "
                                  "fp8_e4m3, fp8_e5m2, bfloat16, float16)")
        return _KV_DTYPE_BYTES[kv_cache_dtype]
    # auto: the model's activation dtype; quantized checkpoints keep a 16-bit one (float8 weights included).
    size = _DTYPE_BYTES.get(profile.dtype, 2)
    return 2 if size < 2 else size


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"
