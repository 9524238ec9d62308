"""The `vllm serve` command line an engine spec turns into (pure), and the gateway process's event loop."""

from __future__ import annotations

from nebula.core.config import EngineConfig
from nebula.core.engine_spec import EngineSpec, gpu_memory_share, vllm_command
from nebula.core.model import Gpu, Task


def spec(**kw: object) -> EngineSpec:
    base: dict[str, object] = {"instance": "qwen:1", "model": "qwen", "source": "/models/qwen", "port": 18001}
    return EngineSpec.from_dict({**base, **kw})


def test_generate_on_gpu_pins_the_placed_gpus() -> None:
    argv, env = vllm_command(spec(gpu_indices=[2, 3]), EngineConfig(), cpu=False)
    assert argv[:3] == ["/opt/nebula/engines/vllm/bin/vllm", "serve", "/models/qwen"]
    assert argv[argv.index("--served-model-name") + 1] == "qwen"
    assert argv[argv.index("--port") + 1] == "18001" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "--enforce-eager" not in argv and "--otlp-traces-endpoint" not in argv


def test_cpu_engines_get_the_cpu_settings() -> None:
    argv, env = vllm_command(spec(), EngineConfig(cpu_kvcache_gib=3), cpu=True)
    assert "--enforce-eager" in argv
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_pooling_tasks_select_vllm_runners() -> None:
    argv, _ = vllm_command(spec(task=Task.EMBED.value), EngineConfig(), cpu=True)
    assert argv[argv.index("--convert") + 1] == "embed"
    argv, _ = vllm_command(spec(task=Task.RERANK.value), EngineConfig(), cpu=True)
    assert argv[argv.index("--convert") + 1] == "classify"
    # A Whisper runs on vLLM's default (generate) runner, which also serves /v1/audio/*.
    argv, _ = vllm_command(spec(task=Task.TRANSCRIBE.value), EngineConfig(), cpu=True)
    assert "--runner" not in argv and "--convert" not in argv


def test_tracing_endpoint_turns_on_vllm_spans_over_otlp_http() -> None:
    argv, env = vllm_command(spec(), EngineConfig(), cpu=True, otlp_endpoint="http://otel:4318/v1/traces")
    assert argv[argv.index("--otlp-traces-endpoint") + 1] == "http://otel:4318/v1/traces"
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"


def test_operator_arguments_come_last_so_they_win() -> None:
    argv, _ = vllm_command(spec(engine_args=["--max-num-seqs", "8"]), EngineConfig(extra_args=("--seed", "1")),
                           cpu=False)
    assert argv[-4:] == ["--seed", "1", "--max-num-seqs", "8"]


def test_gateway_event_loop_choice() -> None:
    import asyncio

    import uvloop

    from nebula.services.gateway.main import gateway_loop_factory

    assert gateway_loop_factory("asyncio") is None
    factory = gateway_loop_factory("uvloop")
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop) and isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()


def test_replicas_sharing_a_gpu_take_their_declared_share() -> None:
    gpus = [Gpu(index=0, name="H100", memory_total_mib=81920, memory_used_mib=0),
            Gpu(index=1, name="L4", memory_total_mib=23034, memory_used_mib=0)]
    assert gpu_memory_share(30720, gpus, [0]) == 0.37  # 30 GiB of 80: rounded down, two fit beside each other
    assert gpu_memory_share(20480, gpus, [0, 1]) == 0.88  # the smallest GPU decides
    assert gpu_memory_share(0, gpus, [0]) == 0.0  # nothing declared: vLLM's default
    assert gpu_memory_share(30720, gpus, [3]) == 0.0  # unknown GPU: vLLM's default
    argv, _ = vllm_command(spec(gpu_indices=[0], gpu_memory_utilization=0.37), EngineConfig(), cpu=False)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.37"
    argv, _ = vllm_command(spec(gpu_memory_utilization=0.37), EngineConfig(), cpu=True)
    assert "--gpu-memory-utilization" not in argv  # no such thing on CPU


def test_generate_engines_keep_stored_responses_unless_configured_off() -> None:
    store = "VLLM_ENABLE_RESPONSES_API_STORE"
    assert vllm_command(spec(), EngineConfig(), cpu=True)[1][store] == "1"
    assert store not in vllm_command(spec(task=Task.EMBED.value), EngineConfig(), cpu=True)[1]
    assert store not in vllm_command(spec(), EngineConfig(responses_store=False), cpu=True)[1]
