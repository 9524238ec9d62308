"""`nebula node join` against a real etcd: the config it writes passes `nebula config check`, points at that
etcd, and a node agent started on it registers with the joined name, address and labels."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nebula.adapters.etcd import EtcdStore
from nebula.core import keys
from nebula.core.model import NodeRecord, dumps, loads
from tests.harness.etcd import EtcdServer
from tests.harness.ports import free_port
from tests.harness.systemd import REPO_ROOT, up

pytestmark = pytest.mark.etcd
PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")


def nebula(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_")}
    return subprocess.run([sys.executable, "-m", "nebula", "--config", str(config), *argv], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


async def get_node(endpoint: str, name: str) -> NodeRecord | None:
    store = await EtcdStore.connect([endpoint], timeout=2)
    try:
        kv = await store.get(keys.node_key(name))
        return NodeRecord.from_dict(loads(kv.value)) if kv else None
    finally:
        await store.close()


async def put_node(endpoint: str, record: NodeRecord) -> None:
    store = await EtcdStore.connect([endpoint], timeout=2)
    try:
        await store.put(keys.node_key(record.name), dumps(record.to_dict()))
    finally:
        await store.close()


async def delete_node(endpoint: str, name: str) -> None:
    store = await EtcdStore.connect([endpoint], timeout=2)
    try:
        await store.delete(keys.node_key(name))
    finally:
        await store.close()


def test_join_writes_a_checked_config_the_agent_runs_with(etcd_server: EtcdServer, tmp_path: Path) -> None:
    config = tmp_path / "nebula.toml"
    assert nebula(config, "config", "init").returncode == 0
    # Where this test's agent keeps its files (the defaults are /run/nebula, /var/lib/nebula).
    (tmp_path / "nebula.d").mkdir()
    (tmp_path / "nebula.d" / "10-test.toml").write_text(
        f'[node]\nrun_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\nport = {free_port()}\n'
        'unit_backend = "process"\n')

    joined = nebula(config, "node", "join", "--etcd", etcd_server.endpoint, "--name", "joined-node",
                    "--labels", "zone=a,gpu=none", "--no-start", "--json")
    assert joined.returncode == 0, joined.stderr
    out = json.loads(joined.stdout)
    assert out["config"] == str(tmp_path / "nebula.d" / "50-node.toml") and out["started"] is False
    assert out["address"] == "127.0.0.1"  # this machine's address on the route to that etcd

    check = nebula(config, "config", "check", "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["ok"] is True, check.stderr
    shown = json.loads(nebula(config, "config", "show", "--json").stdout)
    assert shown["cluster"]["etcd_endpoints"] == [etcd_server.endpoint]
    assert shown["node"]["name"] == "joined-node" and shown["node"]["labels"] == ["zone=a", "gpu=none"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_")} | {"NEBULA_CONFIG": str(config)}
    agent = subprocess.Popen([sys.executable, "-m", "nebula", "node", "run"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        record = None
        while record is None:
            assert agent.poll() is None, agent.stderr.read().decode() if agent.stderr else ""
            assert time.monotonic() < deadline, "the agent did not register"
            record = asyncio.run(get_node(etcd_server.endpoint, "joined-node"))
            time.sleep(0.2)
        assert record.labels == {"zone": "a", "gpu": "none"} and record.address == "127.0.0.1"
        # Joining again from the same machine while its agent runs is fine (same name, same address).
        again = nebula(config, "node", "join", "--etcd", etcd_server.endpoint, "--name", "joined-node",
                       "--no-start")
        assert again.returncode == 0, again.stderr
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        asyncio.run(delete_node(etcd_server.endpoint, "joined-node"))


def test_join_refuses_what_would_not_work(etcd_server: EtcdServer, tmp_path: Path) -> None:
    config = tmp_path / "nebula.toml"
    dead = f"http://127.0.0.1:{free_port()}"
    res = nebula(config, "node", "join", "--etcd", dead, "--no-start")
    assert res.returncode == 5 and res.stderr.count("\n") == 1, res.stderr
    assert f"etcd at {dead} does not answer" in res.stderr and "--listen-client-urls" in res.stderr
    assert not config.exists() and not (tmp_path / "nebula.d" / "50-node.toml").exists()

    asyncio.run(put_node(etcd_server.endpoint, NodeRecord(name="taken-node", address="10.9.9.9", port_min=18000,
                                                          port_max=18999)))
    try:
        res = nebula(config, "node", "join", "--etcd", etcd_server.endpoint, "--name", "taken-node", "--no-start")
        assert res.returncode == 1 and "registered from 10.9.9.9" in res.stderr, res.stderr
        assert not (tmp_path / "nebula.d" / "50-node.toml").exists()
    finally:
        asyncio.run(delete_node(etcd_server.endpoint, "taken-node"))

    res = nebula(config, "node", "join", "--etcd", etcd_server.endpoint, "--labels", "zone")
    assert res.returncode == 2 and "must look like key=value" in res.stderr


@pytest.mark.systemd
def test_join_enables_and_starts_the_agent_under_systemd(etcd_server: EtcdServer) -> None:
    """Where systemd is PID 1, join enables and (re)starts nebula-node.service: the shipped unit, run as root
    from this checkout's venv (the sandbox has no `nebula` user or /usr/bin/nebula)."""
    box = up([REPO_ROOT], name=f"join-{os.getpid()}")
    try:
        box.exec(["rm", "-rf", "/etc/nebula"])  # the sandbox's / is the host's: start from no config at all
        for unit in ("nebula-node.service", "nebula.target"):
            box.install_unit(REPO_ROOT / "units" / unit)
        # The checkout may live under /tmp or /root (a CI clone), which the unit's PrivateTmp= and ProtectHome= hide.
        box.install_dropin("nebula-node.service", f"[Service]\nExecStart=\nExecStart={PYTHON} -m nebula node run\n"
                                                  "User=root\nGroup=root\nPrivateTmp=no\nProtectHome=no\n")
        box.daemon_reload()
        (box.root / "etc/nebula/nebula.d").mkdir(parents=True)
        (box.root / "etc/nebula/nebula.d/10-test.toml").write_text(f"[node]\nport = {free_port()}\n")

        res = box.exec([PYTHON, "-m", "nebula", "node", "join", "--etcd", etcd_server.endpoint, "--name",
                        "sd-joined", "--labels", "zone=sd"], check=False, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "enabled and started nebula-node.service" in res.stdout
        assert box.exec(["systemctl", "is-enabled", "nebula-node.service"]).stdout.strip() == "enabled"
        assert box.show("nebula-node.service", "ActiveState")["ActiveState"] == "active"
        record = asyncio.run(get_node(etcd_server.endpoint, "sd-joined"))
        assert record is not None and record.labels == {"zone": "sd"}
        assert (box.root / "etc/nebula/nebula.toml").read_text().startswith("## Nebula configuration")
    finally:
        try:
            box.systemctl("stop", "nebula-node.service", check=False)
        finally:
            box.down()
            asyncio.run(delete_node(etcd_server.endpoint, "sd-joined"))
