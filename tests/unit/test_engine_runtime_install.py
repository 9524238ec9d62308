"""Runtimes side by side on a machine: scripts/install-engine.sh's choice (run for real, with a fake
nvidia-smi on PATH) and links, what the agent advertises and runs, and what it refuses."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.engine_runtimes import gpus_seen, installed_runtimes
from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import EngineConfig, NebulaConfig, NodeConfig
from nebula.core.engine_spec import EngineSpec
from nebula.core.model import ModelSpec, NodeRecord, Placement, dumps
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.specfiles import SpecFiles
from nebula.services.engine.supervisor import ExitCode, run_engine, spec_runtime_device
from tests.harness.mirrors import mirrored
from tests.unit.test_agent import TableUnits, model_dir, phase

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts/install-engine.sh"
ONE_GPU = "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0c6e2f1a-0000-0000-0000-000000000000)'\n"
NO_DRIVER = "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n"


def fake_smi(tmp_path: Path, script: str) -> str:
    """A PATH whose nvidia-smi is `script`, ahead of the system's tools."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(script)
    smi.chmod(0o755)
    return f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"


def install(path: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("NEBULA_ENGINE_DEVICE", "NEBULA_ENGINE_CACHE")}
    return subprocess.run([str(INSTALL), *args], env={**clean, "PATH": path, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def choice(path: str, *args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    proc = install(path, "--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_auto_takes_the_gpu_lock_where_nvml_sees_a_gpu(tmp_path: Path) -> None:
    target = str(tmp_path / "engines/vllm")
    got = choice(fake_smi(tmp_path, ONE_GPU), target)
    assert got["device"] == "gpu" and got["lock"] == str(REPO / "packaging/engine/vllm-gpu-py311.lock")
    assert got["runtime"] == "vllm-0.32-cu13" and got["link"] == str(tmp_path / "engines/vllm-0.32-cu13")
    assert got["default"] == target
    assert got["venv"].startswith(str(tmp_path / "engines/.venvs/"))
    assert choice(fake_smi(tmp_path, NO_DRIVER), target)["runtime"] == "vllm-0.32-cpu"


def test_overrides_flag_then_environment(tmp_path: Path) -> None:
    gpu, none = fake_smi(tmp_path / "a", ONE_GPU), fake_smi(tmp_path / "b", NO_DRIVER)
    target = str(tmp_path / "engines/vllm")
    assert choice(gpu, target, env={"NEBULA_ENGINE_DEVICE": "cpu"})["device"] == "cpu"
    assert choice(none, target, env={"NEBULA_ENGINE_DEVICE": "gpu"})["device"] == "gpu"
    assert choice(none, "--runtime", "gpu", target, env={"NEBULA_ENGINE_DEVICE": "cpu"})["device"] == "gpu"
    assert choice(gpu, "--runtime=cpu", "--no-default", target)["default"] == "unchanged"
    bad = install(none, "--dry-run", "--runtime", "rocm", target)
    assert bad.returncode == 2 and "--runtime: must be auto, cpu or gpu, got 'rocm'" in bad.stderr


def fake_cached_venv(venv: Path) -> None:
    """What a finished install leaves: the stamp makes install-engine.sh take its fast path (links only)."""
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/vllm").write_text("#!/bin/sh\necho 0.32.0\n")
    (venv / "bin/vllm").chmod(0o755)
    (venv / ".nebula-engine-ok").write_text("vllm=0.32.0\n")


def test_a_second_runtime_installs_beside_the_first(tmp_path: Path) -> None:
    engines, path = tmp_path / "engines", fake_smi(tmp_path, ONE_GPU)
    target = str(engines / "vllm")
    gpu_venv = Path(choice(path, target)["venv"])
    cpu_venv = Path(choice(path, "--runtime", "cpu", target)["venv"])
    assert gpu_venv != cpu_venv
    fake_cached_venv(gpu_venv)
    fake_cached_venv(cpu_venv)

    first = install(path, target)
    assert first.returncode == 0, first.stderr
    assert os.readlink(engines / "vllm-0.32-cu13") == str(gpu_venv)
    assert os.readlink(engines / "vllm") == "vllm-0.32-cu13"  # the default, by name

    before = sorted(p.name for p in gpu_venv.rglob("*"))
    second = install(path, "--runtime", "cpu", "--no-default", target)
    assert second.returncode == 0, second.stderr
    assert os.readlink(engines / "vllm-0.32-cpu") == str(cpu_venv)
    assert os.readlink(engines / "vllm") == "vllm-0.32-cu13"
    assert sorted(p.name for p in gpu_venv.rglob("*")) == before

    cfg = EngineConfig(runtimes_dir=str(engines))
    assert installed_runtimes(cfg) == ("vllm", "vllm-0.32-cpu", "vllm-0.32-cu13")  # not .venvs
    spec = EngineSpec(instance="m", model="m", source="/m", port=18000)
    assert spec_runtime_device(spec, cfg) == "gpu"  # the default link's name says so
    assert spec_runtime_device(EngineSpec(instance="m", model="m", source="/m", port=18000,
                                          engine_runtime="vllm-0.32-cpu"), cfg) == "cpu"

    # A real directory where a link goes is someone's: refused, left alone.
    (engines / "vllm").unlink()
    (engines / "vllm").mkdir()
    refused = install(path, target)
    assert refused.returncode == 1 and "is not a symlink; move it away first" in refused.stderr


def test_gpus_seen_from_nvidia_smi(tmp_path: Path) -> None:
    assert gpus_seen(fake_smi(tmp_path / "a", ONE_GPU)) == 1
    assert gpus_seen(fake_smi(tmp_path / "b", NO_DRIVER)) == 0


def test_installed_runtimes_include_a_default_kept_elsewhere(tmp_path: Path) -> None:
    venv = tmp_path / "old-venv"
    fake_cached_venv(venv)
    cfg = EngineConfig(runtimes_dir=str(tmp_path / "missing"), vllm_venv=str(venv))
    assert installed_runtimes(cfg) == ("vllm",)
    assert installed_runtimes(EngineConfig(runtimes_dir=str(tmp_path / "missing"))) == ()


async def test_agent_runs_installed_runtimes_and_refuses_others(tmp_path: Path) -> None:
    store, units = MemoryStore(), TableUnits()
    installed = ("vllm", "vllm-0.32-cpu")
    node = NodeRecord(name="n1", address="127.0.0.1", port_min=18000, port_max=18010)

    async def health(endpoint: str) -> bool:
        return False

    agent = NodeAgent(NebulaConfig(), node, store, units, SpecFiles(str(tmp_path / "run")), health,
                      CollectorRegistry(), runtimes=lambda: installed)
    await agent.on_new_lease(await store.grant_lease(10))
    source = model_dir(tmp_path)
    for inst, runtime in (("old", "vllm-0.32-cpu"), ("new", "vllm-0.33-cu13")):
        p = Placement(instance=inst, node="n1", port=18000 if inst == "old" else 18001,
                      model=ModelSpec.from_dict({"name": inst, "source": source, "engine_runtime": runtime}))
        await store.put(keys.placement_key("n1", inst), dumps(p.to_dict()))
    snap = await store.list_prefix(keys.node_placements_prefix("n1"))
    agent.on_placements(mirrored(records.PLACEMENTS, {kv.key: kv for kv in snap.items}))
    await agent.reconcile_once()  # the first pass advertises what is installed
    await agent.reconcile_once()

    kv = await store.get(keys.node_key("n1"))
    assert kv is not None and json.loads(kv.value)["runtimes"] == ["vllm", "vllm-0.32-cpu"]
    assert json.loads((tmp_path / "run/engines/old.json").read_text())["engine_runtime"] == "vllm-0.32-cpu"
    assert await phase(store, "old") == "starting"
    assert await phase(store, "new") == "failed" and "new" not in units.units
    status = await store.get(keys.instance_key("new"))
    assert status is not None
    assert json.loads(status.value)["message"] == (
        "engine runtime vllm-0.33-cu13 is not installed on this node (installed: vllm, vllm-0.32-cpu); install it "
        "with `scripts/install-engine.sh --runtime gpu` from a Nebula checkout whose lock makes vllm-0.33-cu13")


def test_the_engine_refuses_a_runtime_that_is_not_installed(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "m.toml").write_text(f'source = "{tmp_path / "model"}"\nport = 18000\n'
                                     'engine_runtime = "vllm-0.32-cu13"\n')
    cfg = NebulaConfig(node=NodeConfig(run_dir=str(tmp_path / "run")),
                       engine=EngineConfig(runtimes_dir=str(tmp_path / "engines"), hand_specs_dir=str(tmp_path)))
    assert run_engine("m", cfg, {}) == ExitCode.BAD_SPEC
    assert "engine runtime vllm-0.32-cu13 is not installed on this node (installed: none); install it with " \
           "`scripts/install-engine.sh --runtime gpu`" in caplog.text
