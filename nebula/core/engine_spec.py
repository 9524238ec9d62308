"""What one engine instance runs: the spec the agent writes and the supervisor reads, and the vLLM command.

The node agent writes `<run_dir>/engines/<instance>.json`; an operator may instead write
`/etc/nebula/engines/<instance>.toml` with the same keys to run `systemctl start nebula-engine@<instance>`
on a box with no control plane.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nebula.core.config import EngineConfig
from nebula.core.engine_args import check_engine_request
from nebula.core.engine_runtime import runtime_venv
from nebula.core.lora import lora_limits
from nebula.core.model import RUNTIME_RE, Gpu, Task, expect_field, expect_int, validate_name
from nebula.core.model_limits import ModelLimit, engine_max_model_len
from nebula.errors import ValidationError


@dataclass(frozen=True)
class EngineSpec:
    instance: str
    model: str
    source: str
    """A local directory holding the weights (the agent resolves hub ids to its cache first)."""
    port: int
    host: str = "127.0.0.1"
    task: Task = Task.GENERATE
    max_model_len: int | None = None
    engine_args: tuple[str, ...] = ()
    gpu_indices: tuple[int, ...] = ()
    gpu_memory_utilization: float = 0.0
    """vLLM's --gpu-memory-utilization: the replica's share of each of its GPUs (0: vLLM's default, 0.9)."""
    trust_remote_code: bool = False
    engine_runtime: str | None = None
    """The runtime (venv) to run: <runtimes_dir>/<engine_runtime> (core/engine_runtime.py); None: the default."""
    tensor_parallel_size: int | None = None
    """GPUs the model is sharded over (--tensor-parallel-size); None: every pinned GPU when more than one."""
    sleep_mode: bool = False
    """Start with vLLM's sleep mode (GPU only): the agent can then put the engine to sleep and wake it."""

    @staticmethod
    def from_dict(obj: Mapping[str, Any], source_name: str = "<spec>") -> EngineSpec:
        try:
            task_raw = expect_field(obj, "task", str, "generate")
            try:
                task = Task(task_raw)
            except ValueError:
                raise ValidationError("task", f"must be one of {', '.join(t.value for t in Task)}") from None
            port = expect_field(obj, "port", int)
            if not 1 <= port <= 65535:
                raise ValidationError("port", "must be a TCP port")
            args = expect_field(obj, "engine_args", list, [])
            if not all(isinstance(a, str) for a in args):
                raise ValidationError("engine_args", "must be a list of strings")
            return EngineSpec(
                instance=expect_field(obj, "instance", str),
                model=validate_name(expect_field(obj, "model", str), "model"),
                source=expect_field(obj, "source", str),
                port=port,
                host=expect_field(obj, "host", str, "127.0.0.1"),
                task=task,
                max_model_len=expect_field(obj, "max_model_len", int, None),
                engine_args=tuple(args),
                gpu_indices=tuple(int(i) for i in expect_field(obj, "gpu_indices", list, [])),
                gpu_memory_utilization=float(expect_field(obj, "gpu_memory_utilization", (int, float), 0.0)),
                trust_remote_code=expect_field(obj, "trust_remote_code", bool, False),
                engine_runtime=_runtime(expect_field(obj, "engine_runtime", str, None)),
                tensor_parallel_size=(None if obj.get("tensor_parallel_size") is None
                                      else expect_int(obj, "tensor_parallel_size", 1, 16)),
                sleep_mode=expect_field(obj, "sleep_mode", bool, False),
            )
        except ValidationError as e:
            raise ValidationError(e.field, f"{source_name}: {e}") from None

    @staticmethod
    def from_toml(text: str, instance: str, source_name: str) -> EngineSpec:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValidationError("", f"{source_name}: not valid TOML: {e}") from None
        data.setdefault("instance", instance)
        data.setdefault("model", instance)
        return EngineSpec.from_dict(data, source_name)

    def to_dict(self) -> dict[str, Any]:
        d = {"instance": self.instance, "model": self.model, "source": self.source, "port": self.port,
             "host": self.host, "task": self.task.value, "max_model_len": self.max_model_len,
             "engine_args": list(self.engine_args), "gpu_indices": list(self.gpu_indices),
             "gpu_memory_utilization": self.gpu_memory_utilization, "trust_remote_code": self.trust_remote_code}
        # Only when set: spec files of engines started before these fields existed read back unchanged.
        if self.engine_runtime is not None:
            d["engine_runtime"] = self.engine_runtime
        if self.tensor_parallel_size is not None:
            d["tensor_parallel_size"] = self.tensor_parallel_size
        if self.sleep_mode:
            d["sleep_mode"] = True
        return d

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def tensor_parallel(self) -> int:
        """The tensor-parallel size vLLM runs with: the declared one, else all the pinned GPUs (at least 1)."""
        return self.tensor_parallel_size or max(1, len(self.gpu_indices))


def vllm_command(spec: EngineSpec, cfg: EngineConfig, *, cpu: bool, otlp_endpoint: str = "",
                 model_limit: ModelLimit | None = None) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` argv and the environment it adds, for `spec` under `cfg`; `otlp_endpoint` (OTLP/HTTP)
    turns on vLLM's request spans, parented by the traceparent header the gateway forwards; `model_limit` (from
    the model's own config files) caps --max-model-len. ValidationError: the spec asks for more than that.
    The caller has checked the spec against cfg (check_engine_spec): engine_args come last, after Nebula's own
    flags."""
    argv = [f"{runtime_venv(cfg, spec.engine_runtime)}/bin/vllm", "serve", spec.source,
            "--served-model-name", spec.model,
            "--host", spec.host, "--port", str(spec.port),
            "--generation-config", "vllm",
            "--disable-uvicorn-access-log"]
    max_len = engine_max_model_len(spec.max_model_len, cfg.default_max_model_len, model_limit)
    if max_len:
        argv += ["--max-model-len", str(max_len)]
    if spec.gpu_memory_utilization and not cpu:
        argv += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:.2f}"]
    if spec.tensor_parallel > 1 and not cpu and not _has_flag(spec.engine_args, "--tensor-parallel-size", "-tp"):
        # Without it vLLM uses one of the GPUs it sees, and a model sized for two never loads.
        argv += ["--tensor-parallel-size", str(spec.tensor_parallel)]
    if spec.task is Task.EMBED:
        argv += ["--runner", "pooling", "--convert", "embed"]
    elif spec.task is Task.RERANK:
        argv += ["--runner", "pooling", "--convert", "classify"]
    if cpu:
        argv += ["--enforce-eager"]
    if otlp_endpoint:
        argv += ["--otlp-traces-endpoint", otlp_endpoint]
    if spec.trust_remote_code:
        argv += ["--trust-remote-code"]
    if spec.sleep_mode and not cpu:  # CUDA only: vLLM's CPU platform has no sleep mode
        argv += ["--enable-sleep-mode"]
    argv += list(cfg.extra_args) + list(spec.engine_args)
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    if lora_limits(spec.engine_args) is not None:
        # The agent loads the model's LoRA adapters at runtime (/v1/load_lora_adapter: core/lora.py); vLLM
        # serves that endpoint only with this set. Whoever reaches an engine can load adapters from the engine's
        # filesystem with it; an engine has no authentication of its own either way ([node] engine_host).
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if cfg.responses_store and spec.task is Task.GENERATE:
        # A deliberate trade (see EngineConfig.responses_store): the store grows until the engine restarts.
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    if spec.sleep_mode and not cpu:
        # vLLM serves /sleep, /wake_up and /is_sleeping only in its dev mode, which also serves other dev routes
        # (cache resets, collective_rpc): an engine has no authentication of its own either way, so it must
        # listen where only the gateway and the agent reach it ([node] engine_host).
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if otlp_endpoint:
        # vLLM defaults to OTLP over gRPC; Nebula speaks OTLP/HTTP everywhere, one endpoint for all.
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind
    elif spec.gpu_indices:
        # Placement numbers GPUs as NVML does (PCI bus order); CUDA's default order (fastest first) differs on
        # mixed machines, so CUDA is told to number them the same way before the indices mean anything.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in spec.gpu_indices)
    return argv, env


def _runtime(name: str | None) -> str | None:
    if name is not None and not RUNTIME_RE.fullmatch(name):
        raise ValidationError("engine_runtime", "must be a runtime name such as vllm-0.32-cu13")
    return name


def _has_flag(args: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def check_engine_spec(spec: EngineSpec, cfg: EngineConfig) -> None:
    """ValidationError when `spec` asks for flags or remote code that `cfg` does not allow (engine_args.py)."""
    check_engine_request(spec.engine_args, spec.trust_remote_code, cfg.allowed_engine_args,
                         cfg.allow_trust_remote_code)


def gpu_memory_share(need_mib: int, gpus: Sequence[Gpu], indices: Sequence[int]) -> float:
    """The share of its GPUs a replica that declared `need_mib` per GPU may take (--gpu-memory-utilization).

    vLLM takes 90% of every GPU it sees by default, so a second replica placed on the same GPU (the
    scheduler packs GPUs by declared memory) could never start. vLLM applies one fraction of each GPU's
    total to all of a replica's GPUs, so on GPUs of different sizes the share is the one that gives the
    smallest GPU its need (the larger ones are asked for more; vLLM sizes the KV cache by its smallest
    worker, so the surplus is never allocated). Each per-GPU share is rounded down, so shares of one GPU
    never add up to more than it holds; 0 (vLLM's default) when nothing was declared or a GPU is unknown.
    """
    totals = {g.index: g.memory_total_mib for g in gpus if g.index in indices and g.memory_total_mib > 0}
    if need_mib <= 0 or not indices or any(i not in totals for i in indices):
        return 0.0
    share = max(math.floor(need_mib / totals[i] * 100) / 100 for i in indices)
    return max(0.01, min(0.95, share))
