"""`nebula status` on a real control plane (etcd, gateway, scheduler, two node agents as processes): healthy,
then a lost node, no scheduler leader, etcd down and the gateway down, each seen with its exit code.

No engine runs: the model's source does not exist, so its replicas fail at once; only their placements
matter here (they make a dead node `lost` rather than gone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import NebulaCluster, running_cluster, wait_until

pytestmark = pytest.mark.etcd


def status(c: NebulaCluster, *args: str) -> tuple[int, str]:
    res = c.cli("status", *args, check=False)
    return res.returncode, res.stdout + res.stderr


def status_json(c: NebulaCluster) -> dict[str, Any]:
    return dict(json.loads(c.cli("status", "--json", check=False).stdout))


def nodes(c: NebulaCluster) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in status_json(c)["nodes"] or []}


def test_status_follows_the_cluster_health(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "etcd").mkdir()
    with running_cluster(tmp_path / "c", tmp_path / "etcd", node_grace_s=120, extra_nodes=("node-b",)) as c:
        wait_until(lambda: status(c)[0] == 0, 30, "a healthy status", c)
        code, out = status(c)
        assert "leader node-a:" in out and "2 alive" in out and out.rstrip().endswith("healthy"), out
        data = status_json(c)
        assert data["etcd"]["ok"] and sorted(nodes(c)) == ["node-a", "node-b"]

        c.cli("load", "ghost", "--source", "/nonexistent/ghost-model", "--replicas", "2")
        wait_until(lambda: all(n["placements"] == 1 for n in nodes(c).values()), 30, "one replica per node", c)
        wait_until(lambda: "ghost:1 failed on" in status(c)[1] or "ghost failed on" in status(c)[1], 30,
                   "the failed replicas listed as problems", c)
        assert status(c)[0] == 1

        c.kill("node:node-b")  # SIGKILL: its record goes when its lease (5 s) runs out
        wait_until(lambda: nodes(c).get("node-b", {}).get("alive") is False, 30, "node-b lost", c)
        code, out = status(c)
        assert code == 1 and "node node-b is lost" in out and "1 LOST" in out, out
        assert nodes(c)["node-b"] == {"name": "node-b", "alive": False, "placements": 1}

        c.kill("scheduler")
        wait_until(lambda: status_json(c)["scheduler"]["leader"] is None, 30, "no scheduler leader", c)
        code, out = status(c)
        assert code == 1 and "NO LEADER" in out and "no scheduler leader" in out

        c.etcd.stop()
        code, out = status(c)
        assert code == 1 and "etcd       UNREACHABLE" in out and "etcd is unreachable from the gateway" in out, out

        c.kill("gateway")
        code, out = status(c)
        assert code == 5 and "gateway    UNREACHABLE" in out
        code, out = status(c, "--json")
        assert code == 5 and out.startswith("nebula: cannot reach the gateway") and out.count("\n") == 1
