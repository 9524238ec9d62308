"""The GPU part of an engine's command: tensor parallelism, pinning in NVML's (PCI) order, and the share of
each GPU a replica may take, on GPUs of one size and of several."""

from __future__ import annotations

import pytest

from nebula.core.config import EngineConfig
from nebula.core.engine_spec import EngineSpec, gpu_memory_share, vllm_command
from nebula.core.model import Gpu
from nebula.errors import ValidationError

GIB = 1024


def spec(**kw: object) -> EngineSpec:
    base: dict[str, object] = {"instance": "llama", "model": "llama", "source": "/models/llama", "port": 18001}
    return EngineSpec.from_dict({**base, **kw})


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_two_pinned_gpus_shard_the_model_over_both() -> None:
    argv, env = vllm_command(spec(gpu_indices=[4, 5]), EngineConfig(), cpu=False)
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_one_gpu_has_no_tensor_parallel_flag_and_cpu_none_at_all() -> None:
    argv, env = vllm_command(spec(gpu_indices=[1]), EngineConfig(), cpu=False)
    assert "--tensor-parallel-size" not in argv and env["CUDA_VISIBLE_DEVICES"] == "1"
    argv, env = vllm_command(spec(gpu_indices=[0, 1]), EngineConfig(), cpu=True)
    assert "--tensor-parallel-size" not in argv and "CUDA_DEVICE_ORDER" not in env


def test_a_declared_tensor_parallel_size_wins() -> None:
    argv, _ = vllm_command(spec(gpu_indices=[0, 1, 2, 3], tensor_parallel_size=2), EngineConfig(), cpu=False)
    assert flag(argv, "--tensor-parallel-size") == "2"
    argv, _ = vllm_command(spec(gpu_indices=[0, 1], tensor_parallel_size=1), EngineConfig(), cpu=False)
    assert "--tensor-parallel-size" not in argv


def test_an_engine_arg_naming_tensor_parallelism_is_not_doubled() -> None:
    argv, _ = vllm_command(spec(gpu_indices=[0, 1], engine_args=["--tensor-parallel-size=2"]), EngineConfig(),
                           cpu=False)
    assert argv.count("--tensor-parallel-size") == 0 and argv[-1] == "--tensor-parallel-size=2"


def test_tensor_parallel_size_round_trips_and_old_spec_files_read_the_same() -> None:
    s = spec(gpu_indices=[0, 1], tensor_parallel_size=2)
    assert EngineSpec.from_dict(s.to_dict()) == s
    old = spec(gpu_indices=[0, 1])
    assert "tensor_parallel_size" not in old.to_dict() and old.tensor_parallel == 2
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        spec(tensor_parallel_size=0)


def test_share_gives_each_gpu_its_per_gpu_need() -> None:
    same = [Gpu(0, "H200", 141 * GIB, 0), Gpu(1, "H200", 141 * GIB, 0)]
    assert gpu_memory_share(70 * GIB, same, [0, 1]) == 0.49  # 70 of 141 on each, rounded down
    mixed = [Gpu(0, "H100", 80 * GIB, 0), Gpu(1, "A100", 40 * GIB, 0)]
    # One fraction for both GPUs: the 40 GiB one must still get its 20 GiB.
    assert gpu_memory_share(20 * GIB, mixed, [0, 1]) == 0.5
    assert gpu_memory_share(20 * GIB, mixed, [0]) == 0.25
    assert gpu_memory_share(20 * GIB, mixed, [0, 7]) == 0.0  # a GPU the node does not know: vLLM's default
    assert gpu_memory_share(100 * GIB, mixed, [0]) == 0.95  # never all of it
