"""The whole control plane as the shipped units, under a real systemd, serving real vLLM.

Runs the units from units/ as they ship (User=nebula, hardening, Type=notify, watchdog), with the polkit rule
that lets the agent manage engine units, and this checkout installed in a venv as /usr/bin/nebula. Proves: a load goes
through etcd to `nebula-engine@tiny.service` started over D-Bus; restarting every control-plane unit restarts
no engine; unload stops the engine unit.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.harness.cluster import required_path, wait_until
from tests.harness.etcd import EtcdServer
from tests.harness.ports import free_port, free_port_range
from tests.harness.systemd import REPO_ROOT, SystemdSandbox, up

pytestmark = [pytest.mark.systemd, pytest.mark.engine, pytest.mark.etcd]
TEST_VENV = Path("/opt/nebula-test/venv")
CONTROL_PLANE = ("nebula-gateway", "nebula-scheduler", "nebula-node")


@dataclass
class UnitCluster:
    sandbox: SystemdSandbox
    gateway_url: str

    def nebula(self, *args: str, check: bool = True) -> str:
        res = self.sandbox.exec(["/usr/bin/nebula", *args], check=check, timeout=120)
        return res.stdout

    def models(self) -> list[dict[str, object]]:
        return list(json.loads(self.nebula("list", "--json")))

    def engine(self) -> dict[str, str]:
        return self.sandbox.show("nebula-engine@tiny.service", "ActiveState", "MainPID", "NRestarts")

    def logs(self) -> str:
        out = self.sandbox.exec(["journalctl", "--no-pager", "-n", "200", "-u", "nebula-*"], check=False)
        return out.stdout


@pytest.fixture(scope="module")
def unit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnitCluster]:
    venv = required_path("NEBULA_TEST_VLLM_VENV")
    uv = os.environ.get("UV") or shutil.which("uv")
    if not uv:
        pytest.fail("uv is needed to install this checkout inside the sandbox (scripts/test.sh provides it)")
    etcd = EtcdServer.launch(tmp_path_factory.mktemp("sd-etcd"))
    try:
        sandbox = up([REPO_ROOT], name=f"cluster-{os.getpid()}")
    except BaseException:
        etcd.stop()  # the sandbox never came up: its teardown below will not run
        raise
    try:
        ports = {svc: free_port() for svc in CONTROL_PLANE}
        engine_base = free_port_range(20)
        root = sandbox.root
        (root / "etc/nebula").mkdir(parents=True, exist_ok=True)
        (root / "etc/nebula/nebula.toml").write_text(f"""
[cluster]
etcd_endpoints = ["{etcd.endpoint}"]
[gateway]
port = {ports['nebula-gateway']}
[scheduler]
port = {ports['nebula-scheduler']}
[node]
name = "sd-node"
port = {ports['nebula-node']}
port_min = {engine_base}
port_max = {engine_base + 19}
[engine]
vllm_venv = "{venv}"
vllm_device = "cpu"
default_max_model_len = 512
""")
        # Install this checkout where the units can see it: the checkout may live under /tmp or /root, which
        # PrivateTmp= and ProtectHome= hide from the services (as they would on a real host).
        sandbox.exec([uv, "venv", "-q", "--python", "/usr/bin/python3", str(TEST_VENV)], timeout=120)
        sandbox.exec([uv, "pip", "install", "-q", "--python", str(TEST_VENV / "bin/python"), str(REPO_ROOT)],
                     timeout=600)
        (root / "usr/bin/nebula").unlink(missing_ok=True)
        (root / "usr/bin/nebula").symlink_to(TEST_VENV / "bin" / "nebula")
        # The package's users: nebula (control plane) and nebula-engine (engines).
        sandbox.exec(["systemd-sysusers", str(REPO_ROOT / "packaging/sysusers.d/nebula.conf")])
        polkit = root / "etc/polkit-1/rules.d"
        polkit.mkdir(parents=True, exist_ok=True)
        (polkit / "50-nebula.rules").write_text((REPO_ROOT / "packaging/polkit/50-nebula.rules").read_text())
        for unit in sorted((REPO_ROOT / "units").iterdir()):
            sandbox.install_unit(unit)
        sandbox.daemon_reload()
        sandbox.systemctl("start", *(f"{u}.service" for u in CONTROL_PLANE))
        yield UnitCluster(sandbox, f"http://127.0.0.1:{ports['nebula-gateway']}")
    finally:
        try:
            sandbox.systemctl("stop", "nebula.target", check=False)
        finally:
            sandbox.down()
            etcd.stop()


def test_units_load_chat_restart_control_plane_unload(unit_cluster: UnitCluster) -> None:
    c = unit_cluster
    for svc in CONTROL_PLANE:
        state = c.sandbox.show(f"{svc}.service", "ActiveState", "User")
        assert state == {"ActiveState": "active", "User": "nebula"}, (svc, state)
    models = Path(required_path("NEBULA_TEST_MODELS"))
    c.nebula("load", "tiny", "--source", str(models / "tiny-llama"))

    def ready() -> bool:
        return any(m["name"] == "tiny" and m["ready"] == 1 for m in c.models())

    wait_until(ready, 420, "tiny ready under systemd", None, interval_s=1.0)
    before = c.engine()
    assert before["ActiveState"] == "active" and before["NRestarts"] == "0"
    assert c.sandbox.show("nebula-engine@tiny.service", "User")["User"] == "nebula-engine"

    client = openai.OpenAI(base_url=c.gateway_url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None

    # Restarting the whole control plane is a non-event for the engine.
    c.sandbox.systemctl("restart", *(f"{u}.service" for u in CONTROL_PLANE))
    time.sleep(3)
    assert c.engine() == before, c.logs()
    wait_until(ready, 30, "tiny ready again after control-plane restart", None)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "again"}],
                                           max_tokens=4)
    assert reply.choices[0].message.content is not None

    # gateway.workers = 2 under the unit's hardening: the main process keeps two workers on the port, tells
    # systemd READY=1 once both are (NotifyAccess=main), and requests are served.
    dropin = c.sandbox.root / "etc/nebula/nebula.d/60-workers.toml"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[gateway]\nworkers = 2\n")
    c.sandbox.systemctl("restart", "nebula-gateway.service")
    gateway = c.sandbox.show("nebula-gateway.service", "ActiveState", "MainPID", "StatusText")
    assert gateway["ActiveState"] == "active" and gateway["StatusText"] == "2/2 workers ready", gateway
    main_pid = gateway["MainPID"]
    workers = c.sandbox.exec(["cat", f"/proc/{main_pid}/task/{main_pid}/children"]).stdout.split()
    assert len(workers) == 2, workers

    def chat_through_a_worker() -> bool:
        # Fresh from their start, workers answer 503 until their mirrors of etcd are loaded.
        try:
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w"}],
                                                   max_tokens=4)
        except openai.APIStatusError as e:
            assert e.status_code == 503, e
            return False
        return reply.choices[0].message.content is not None

    wait_until(chat_through_a_worker, 30, "a chat through the gateway's workers", None)

    # The engine's journal carries vLLM's own output and the supervisor's structured fields.
    records = c.sandbox.journal("nebula-engine@tiny.service")
    assert any(r.get("NEBULA_INSTANCE") == "tiny" and r.get("NEBULA_MODEL") == "tiny" for r in records)
    assert any("Application startup complete" in str(r.get("MESSAGE", "")) for r in records)

    c.nebula("unload", "tiny")
    wait_until(lambda: c.engine()["ActiveState"] in ("inactive", ""), 60, "engine unit stopped", None)
    wait_until(lambda: not c.models(), 30, "tiny gone from the admin API", None)
