"""`nebula node join`'s engine step: the runtime the machine calls for against those installed, with the
install command when they differ (never failing the join)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nebula.cli.client import CliError
from nebula.cli.node_join import EngineCheck, JoinRequest, engine_check, join
from nebula.core.config import EngineConfig, NebulaConfig
from nebula.core.engine_runtime import engine_advice

REQ = JoinRequest(etcd=("http://10.0.0.5:2379",), name="gpu7", address="10.0.0.7")


def free(_: NebulaConfig, __: str) -> str | None:
    return None


def test_advice_for_each_machine() -> None:
    cfg = EngineConfig()
    assert engine_advice("gpu", ("vllm", "vllm-0.32-cu13"), "vllm-0.32-cu13", cfg) == ""
    assert engine_advice("cpu", ("vllm",), None, cfg) == ""  # a venv of its own: its device is not known
    assert engine_advice("gpu", (), None, cfg) == (
        "no default engine runtime at /opt/nebula/engines/vllm, so no model starts here: install one with "
        "`scripts/install-engine.sh --runtime gpu` (from a Nebula checkout, as root)")
    assert engine_advice("gpu", ("vllm", "vllm-0.32-cpu"), "vllm-0.32-cpu", cfg) == (
        "the default engine runtime is vllm-0.32-cpu, a CPU build, but this machine calls for the GPU one: "
        "install it with `scripts/install-engine.sh --runtime gpu` (from a Nebula checkout, as root)")


def test_join_prints_the_engine_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asked: list[str] = []

    def engine(cfg: NebulaConfig, requested: str, env: object) -> EngineCheck:
        asked.append(requested)
        return EngineCheck("gpu", 2, (), None, engine_advice("gpu", (), None, cfg.engine))

    main = tmp_path / "nebula.toml"
    req = JoinRequest(etcd=REQ.etcd, name=REQ.name, address=REQ.address, engine="gpu")
    assert join(req, {}, str(main), start=False, systemd=False, as_json=False, check=free, engine=engine) == 0
    out = capsys.readouterr().out
    assert asked == ["gpu"]
    assert "engine: no default engine runtime at /opt/nebula/engines/vllm" in out
    assert "`scripts/install-engine.sh --runtime gpu`" in out

    fine = EngineCheck("gpu", 8, ("vllm", "vllm-0.32-cu13"), "vllm-0.32-cu13", "")
    assert join(REQ, {}, str(main), start=False, systemd=False, as_json=True, check=free,
                engine=lambda *_: fine) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == {
        "device": "gpu", "gpus": 8, "runtimes": ["vllm", "vllm-0.32-cu13"], "default": "vllm-0.32-cu13",
        "advice": ""}
    join(REQ, {}, str(main), start=False, systemd=False, as_json=False, check=free, engine=lambda *_: fine)
    assert "engine runtimes: vllm, vllm-0.32-cu13 (default: vllm-0.32-cu13; 8 GPU(s) seen)" in capsys.readouterr().out


def test_engine_check_reads_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    engines = tmp_path / "engines"
    (engines / ".venvs/abc/bin").mkdir(parents=True)
    (engines / ".venvs/abc/bin/vllm").write_text("#!/bin/sh\n")
    (engines / ".venvs/abc/bin/vllm").chmod(0o755)
    os.symlink(engines / ".venvs/abc", engines / "vllm-0.32-cpu")
    os.symlink("vllm-0.32-cpu", engines / "vllm")
    cfg = NebulaConfig(engine=EngineConfig(runtimes_dir=str(engines)))
    got = engine_check(cfg, "auto", {})
    assert (got.device, got.gpus, got.runtimes, got.linked) == ("gpu", 1, ("vllm", "vllm-0.32-cpu"), "vllm-0.32-cpu")
    assert "a CPU build, but this machine calls for the GPU one" in got.advice
    assert engine_check(cfg, "auto", {"NEBULA_ENGINE_DEVICE": "cpu"}).advice == ""
    with pytest.raises(CliError, match="NEBULA_ENGINE_DEVICE: must be auto, cpu or gpu"):
        engine_check(cfg, "auto", {"NEBULA_ENGINE_DEVICE": "tpu"})
