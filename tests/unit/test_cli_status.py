"""`nebula status` against a real gateway app (in-memory store): /v1/admin/status, exit codes, --watch."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from nebula.cli.client import AdminClient
from nebula.cli.main import main
from nebula.cli.status import CLEAR, watch
from tests.harness.ports import free_port
from tests.unit.served_gateway import ADMIN_KEY, ServedGateway, served_gateway

NODE_A = {"name": "node-a", "address": "10.0.0.1", "port_min": 18000, "port_max": 18999,
          "gpus": [{"index": 0, "name": "H100", "memory_total_mib": 81920, "memory_used_mib": 40960}],
          "labels": {"zone": "a"}, "agent_version": "0.1.0"}
QWEN = {"name": "qwen", "source": "/models/qwen", "replicas": 2}


def instance(name: str, node: str, phase: str, message: str = "") -> dict[str, Any]:
    return {"instance": name, "model": "qwen", "node": node, "phase": phase, "endpoint": "http://10.0.0.1:18000",
            "message": message}


@pytest.fixture
def cluster() -> Iterator[ServedGateway]:
    """node-a alive with one ready replica; node-b lost (placement kept, no record); a scheduler leader."""
    with served_gateway() as gw:
        gw.put("/nebula/leader/scheduler", "node-a:4242")
        gw.put("/nebula/nodes/node-a", NODE_A)
        gw.put("/nebula/models/qwen", QWEN)
        gw.put("/nebula/placements/node-a/qwen", {"placeholder": True})
        gw.put("/nebula/placements/node-b/qwen:1", {"placeholder": True})
        gw.put("/nebula/instances/qwen", instance("qwen", "node-a", "ready"))
        yield gw


def status(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    env = {"NEBULA_URL": url, "NEBULA_CONFIG": "/nonexistent/nebula.toml", "NEBULA_ADMIN_KEY": ADMIN_KEY}
    code = main(["status", *argv], env)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_json_has_health_nodes_and_models(capsys: pytest.CaptureFixture[str], cluster: ServedGateway) -> None:
    code, out, _ = status(capsys, cluster.url, "--json")
    data = json.loads(out)
    assert code == 1  # a lost node is a problem
    assert data["etcd"]["ok"] is True and data["scheduler"] == {"ok": True, "leader": "node-a:4242"}
    assert data["gateway"]["ok"] is True
    nodes = {n["name"]: n for n in data["nodes"]}
    assert nodes["node-a"]["alive"] is True and nodes["node-a"]["labels"] == {"zone": "a"}
    assert nodes["node-a"]["placements"] == 1
    assert nodes["node-b"] == {"name": "node-b", "alive": False, "placements": 1}
    assert [(m["name"], m["ready"], m["spec"]["replicas"]) for m in data["models"]] == [("qwen", 1, 2)]


def test_status_text_and_exit_code_follow_health(capsys: pytest.CaptureFixture[str], cluster: ServedGateway) -> None:
    code, out, _ = status(capsys, cluster.url)
    assert code == 1
    assert "leader node-a:4242" in out and "1 LOST" in out
    assert "node-b is lost" in out and "PROBLEMS" in out
    row = next(line for line in out.splitlines() if line.startswith("node-a "))
    assert row.split() == ["node-a", "alive", "10.0.0.1", "1", "40.0/80.0", "GiB", "-", "zone=a", "1"]
    cluster.delete("/nebula/placements/node-b/qwen:1")  # the scheduler moved the replica
    code, out, _ = status(capsys, cluster.url)
    assert code == 0 and out.rstrip().endswith("healthy")
    cluster.delete("/nebula/leader/scheduler")
    code, out, _ = status(capsys, cluster.url)
    assert code == 1 and "NO LEADER" in out and "no scheduler leader" in out


def test_etcd_down_is_reported_not_an_error(capsys: pytest.CaptureFixture[str], cluster: ServedGateway) -> None:
    cluster.store.set_reachable(False)
    code, out, _ = status(capsys, cluster.url, "--json")
    data = json.loads(out)
    assert code == 1 and data["etcd"]["ok"] is False and data["nodes"] is None
    code, out, _ = status(capsys, cluster.url)
    assert code == 1 and "etcd       UNREACHABLE" in out and "etcd is unreachable from the gateway" in out


def test_gateway_down(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, _ = status(capsys, url)
    assert code == 5 and "gateway    UNREACHABLE" in out and "nebula up" in out
    code, out, err = status(capsys, url, "--json")
    assert code == 5 and out == "" and err.startswith("nebula: cannot reach the gateway") and err.count("\n") == 1


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_prints_a_frame_per_interval_when_piped(cluster: ServedGateway) -> None:
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        cluster.put("/nebula/instances/qwen:1", instance("qwen:1", "node-a", "starting", "loading weights"))

    out = io.StringIO()
    assert watch(AdminClient(cluster.url, ADMIN_KEY), interval_s=0.5, out=out, sleep=sleep, frames=2) == 0
    frames = out.getvalue().split("nebula status  ")[1:]
    assert slept == [0.5] and len(frames) == 2 and CLEAR not in out.getvalue()
    assert "loading weights" not in frames[0] and "loading weights" in frames[1]


def test_watch_redraws_in_place_and_ctrl_c_exits_0(cluster: ServedGateway) -> None:
    calls = 0

    def sleep(_: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt

    out = Tty()
    assert watch(AdminClient(cluster.url, ADMIN_KEY), interval_s=1, out=out, sleep=sleep) == 0
    text = out.getvalue()
    assert text.count(CLEAR) == 2 and text.startswith(CLEAR) and "(Ctrl-C to quit)" in text


def test_watch_keeps_going_while_the_gateway_is_down() -> None:
    out = io.StringIO()
    client = AdminClient(f"http://127.0.0.1:{free_port()}", ADMIN_KEY, timeout_s=1)
    assert watch(client, interval_s=1, out=out, sleep=lambda _: None, frames=2) == 0
    assert out.getvalue().count("gateway    UNREACHABLE") == 2
