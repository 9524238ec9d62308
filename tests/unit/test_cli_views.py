"""What the CLI prints, as pure functions of the admin API's JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nebula.cli.views import duration, model_rows, percent, status_frame, status_problems, wait_line


def inst(name: str, phase: str, node: str = "gpu1", message: str = "", progress: float | None = None
         ) -> dict[str, Any]:
    return {"instance": name, "phase": phase, "node": node, "message": message, "progress": progress}


def model(name: str, replicas: int | None, *instances: dict[str, Any], pending: str | None = None
          ) -> dict[str, Any]:
    spec = {"name": name, "task": "generate", "replicas": replicas} if replicas else None
    return {"name": name, "spec": spec, "ready": sum(1 for i in instances if i["phase"] == "ready"),
            "instances": list(instances), "pending_reason": pending}


HEALTHY: dict[str, Any] = {
    "gateway": {"ok": True, "version": "1.2.3", "ready_replicas": 1},
    "etcd": {"ok": True, "latency_ms": 1.25},
    "scheduler": {"ok": True, "leader": "gpu1:77"},
    "nodes": [{"name": "gpu1", "alive": True, "address": "10.0.0.1", "labels": {"zone": "a", "gpu": "h100"},
               "placements": 1,
               "gpus": [{"memory_total_mib": 81920, "memory_used_mib": 20480, "utilization": 0.3},
                        {"memory_total_mib": 81920, "memory_used_mib": 0, "utilization": 0.5}]}],
    "models": [model("qwen", 1, inst("qwen", "ready"))],
}


@pytest.mark.parametrize(("fraction", "step", "text"), [(0.437, 1, "43%"), (0.437, 10, "40%"), (1.0, 10, "100%"),
                                                        (1.5, 1, "100%"), (-0.1, 1, "0%")])
def test_percent(fraction: float, step: int, text: str) -> None:
    assert percent(fraction, step) == text


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59.9, "59s"), (65, "1m05s"), (3725, "1h02m")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_wait_line_shows_phases_progress_and_time() -> None:
    m = model("qwen", 2, inst("qwen", "downloading", message="model.safetensors", progress=0.437),
              inst("qwen:1", "starting", message="loading weights"))
    assert wait_line(m, 65) == "qwen: 0/2 ready [1 downloading, 1 starting], downloading 43%: model.safetensors, 1m05s"
    assert wait_line(m, None, step=10) == ("qwen: 0/2 ready [1 downloading, 1 starting], "
                                           "downloading 40%: model.safetensors")
    assert wait_line(model("qwen", 1, pending="no node has 80 GiB of GPU memory free"), 3) == \
        "qwen: 0/1 ready [waiting for placement: no node has 80 GiB of GPU memory free], 3s"
    assert wait_line(model("qwen", 1, inst("qwen", "ready")), 9) == "qwen: 1/1 ready [1 ready], 9s"


def test_model_rows() -> None:
    rows = model_rows([model("a", 1, pending="no node matches the model's labels"),
                       model("b", None, inst("b", "draining")),
                       model("c", 1, inst("c", "downloading", progress=0.5, message="x.bin"))])
    assert rows == [["a", "generate", "0/1", "pending", "-", "-",
                     "waiting for placement: no node matches the model's labels"],
                    ["b", "-", "0/-", "draining", "b", "gpu1", "unloading: draining"],
                    ["c", "generate", "0/1", "downloading", "c", "gpu1", "50%: x.bin"]]


def test_an_elastic_model_with_no_replica_says_why_rather_than_pending() -> None:
    idle, waking = model("z", 1), model("w", 1)
    idle["state"], waking["state"] = "idle", "waking"
    assert model_rows([idle, waking]) == [
        ["z", "generate", "0/1", "idle", "-", "-", "scaled to zero: its next request wakes it"],
        ["w", "generate", "0/1", "waking", "-", "-", "waking: requests are held until a replica is ready"]]


def test_healthy_frame() -> None:
    frame = status_frame(HEALTHY, url="http://gw:8000", title="T")
    lines = frame.splitlines()
    assert lines[:2] == ["T", ""]
    assert "  gateway    ok  http://gw:8000, nebula 1.2.3, 1 ready replica(s) routable" in lines
    assert "  etcd       ok  answered in 1.2 ms" in lines
    assert "  scheduler  ok  leader gpu1:77" in lines
    assert "  agents     ok  1 alive" in lines
    node = next(line for line in lines if line.startswith("gpu1 "))
    assert node.split() == ["gpu1", "alive", "10.0.0.1", "2", "20.0/160.0", "GiB", "40%", "gpu=h100,zone=a", "1"]
    assert lines[-1] == "healthy" and status_problems(HEALTHY) == []


def test_gpu_memory_used_outside_nebula_is_shown() -> None:
    busy = json.loads(json.dumps(HEALTHY))
    busy["nodes"][0]["gpus"][0]["memory_outside_mib"] = 71680
    node = next(line for line in status_frame(busy, url="http://gw:8000", title="T").splitlines()
                if line.startswith("gpu1 "))
    assert "20.0/160.0 GiB (70.0 outside)" in node, node


def test_problems_each_name_the_fix() -> None:
    data = HEALTHY | {
        "scheduler": {"ok": False, "leader": None},
        "nodes": HEALTHY["nodes"] + [{"name": "gpu2", "alive": False, "placements": 3}],
        "models": [model("qwen", 1, inst("qwen", "failed", message="CUDA out of memory"))],
    }
    assert status_problems(data) == [
        "no scheduler leader: nothing gets placed (`nebula logs scheduler`)",
        "node gpu2 is lost: its agent stopped renewing its lease; its 3 replica(s) move elsewhere after "
        "scheduler.node_grace_s",
        "qwen failed on gpu1: CUDA out of memory (`nebula logs qwen`)",
    ]
    frame = status_frame(data, url="u")
    assert "scheduler  NO LEADER" in frame and "agents     1 LOST     lost: gpu2; 1 alive" in frame
    assert "gpu2  LOST" in frame and frame.count("\n  - ") == 3
    no_nodes = status_problems(HEALTHY | {"nodes": []})
    assert no_nodes == ["no node agent is registered (start nebula-node, or `nebula node join` on a node)"]


def test_etcd_down_and_gateway_down_frames() -> None:
    down = {"gateway": {"ok": True, "version": "1"}, "etcd": {"ok": False, "error": "StoreUnavailableError"},
            "scheduler": {"ok": None, "leader": None}, "nodes": None, "models": None}
    frame = status_frame(down, url="u")
    assert "etcd       UNREACHABLE  StoreUnavailableError" in frame and "NODES" not in frame
    assert "scheduler  ?            unknown (etcd unreachable)" in frame
    assert len(status_problems(down)) == 1
    frame = status_frame(None, url="http://gw:8000", error="connection refused")
    assert "gateway    UNREACHABLE  http://gw:8000: connection refused" in frame
    assert "PROBLEMS" not in frame and "healthy" not in frame


def test_width_clips_every_line() -> None:
    data = HEALTHY | {"models": [model("qwen", 1, inst("qwen", "starting", message="x" * 300))]}
    frame = status_frame(data, url="u", width=40)
    assert max(len(line) for line in frame.splitlines()) == 40
    assert max(len(line) for line in status_frame(data, url="u").splitlines()) > 300
