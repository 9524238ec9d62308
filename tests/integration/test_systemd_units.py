"""The shipped units, checked offline, and the engine unit run by a REAL systemd (the nspawn sandbox).

The engine tests install units/nebula-engine@.service as shipped, plus a drop-in that points ExecStart at this
checkout's supervisor and a fake vLLM (serves /health on --port), and drive it over D-Bus with
SystemdEngineUnits, exactly as the node agent does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nebula.adapters.systemd import SystemdEngineUnits, systemd_is_pid1
from nebula.core.phase import error_line
from nebula.core.units import UnitState, UnitStatus, engine_unit_name
from nebula.errors import TemporaryError
from nebula.services.agent.agent import FAILURE_LINES
from tests.harness.ports import free_port
from tests.harness.systemd import REPO_ROOT, SystemdSandbox

UNITS = REPO_ROOT / "units"
CONTROL_PLANE = ("nebula-gateway.service", "nebula-scheduler.service", "nebula-node.service")
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"

# A stand-in for `vllm serve`: sleeps --fake-load-s ("loading the model"), then answers GET /health.
# With --fake-hang-marker FILE present, the next request hangs forever (TCP accepted, no answer), once.
# --fake-read FILE / --fake-write FILE (repeatable): try to, and print what happened.
FAKE_VLLM = """\
import os, signal, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default

for flag, mode in (("--fake-read", "r"), ("--fake-write", "a")):
    for path in [args[i + 1] for i, a in enumerate(args) if a == flag]:
        try:
            open(path, mode).close()
            print(f"fake {flag[7:]} {path}: ok", flush=True)
        except OSError as e:
            print(f"fake {flag[7:]} {path}: {type(e).__name__}", flush=True)

host, port = opt("--host", "127.0.0.1"), int(opt("--port"))
marker = opt("--fake-hang-marker")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"fake vllm {opt('--served-model-name')} loading on {host}:{port}", flush=True)
time.sleep(float(opt("--fake-load-s", "0")))

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if marker and os.path.exists(marker):
            os.unlink(marker)
            time.sleep(3600)
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

HTTPServer((host, port), Handler).serve_forever()
"""


def health_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return int(resp.status)
    except (urllib.error.URLError, OSError):
        return None


# --- offline checks of the shipped unit files -----------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks ExecStart binaries and referenced units against --root: give it base units and a stub CLI.
    (tmp_path / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)
    stub = tmp_path / "usr" / "bin" / "nebula"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    shutil.copytree(UNITS, unit_dir)
    names = [*CONTROL_PLANE, "nebula-engine@qwen.service", "nebula.target"]
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}", *names],
                          cwd=unit_dir, capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 on parse warnings: any output at all is a failure.
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.parametrize(("unit", "threshold"), [*((u, 2.0) for u in CONTROL_PLANE),
                                                 ("nebula-engine@.service", 2.0)])
def test_units_are_hardened(unit: str, threshold: float) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNITS / unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    last = proc.stdout.strip().splitlines()[-1]
    score = float(last.split(":")[-1].split()[0])
    assert score <= threshold, proc.stdout


def test_engine_unit_keeps_gpu_access_and_drains() -> None:
    text = (UNITS / "nebula-engine@.service").read_text()
    lines = set(text.splitlines())
    assert "PrivateDevices=yes" not in lines and "MemoryDenyWriteExecute=yes" not in lines
    assert {"Type=notify", "KillMode=mixed", "Restart=on-failure", "PartOf=nebula.target"} <= lines
    for unit in CONTROL_PLANE:
        assert "PartOf=nebula.target" in (UNITS / unit).read_text().splitlines()


# --- the D-Bus adapter without a bus --------------------------------------------------------------------


async def test_unreachable_bus_is_a_temporary_error(tmp_path: Path) -> None:
    units = SystemdEngineUnits(f"unix:path={tmp_path}/no-bus", call_timeout_s=2)
    with pytest.raises(TemporaryError):
        await units.list()
    with pytest.raises(TemporaryError):
        await units.start("x")
    await units.close()


def test_systemd_is_pid1_looks_for_run_systemd_system(tmp_path: Path) -> None:
    assert not systemd_is_pid1(tmp_path)
    (tmp_path / "systemd" / "system").mkdir(parents=True)
    assert systemd_is_pid1(tmp_path)


# --- the engine unit under a real systemd ----------------------------------------------------------------


@dataclass(frozen=True)
class EngineRig:
    sandbox: SystemdSandbox
    dir: Path

    def spec(self, instance: str, *, source: Path | None = None, args: tuple[str, ...] = ()) -> int:
        """Write the agent-style spec of `instance` (a fresh port); returns the port."""
        port = free_port()
        spec = {"instance": instance, "model": f"m-{instance}", "source": str(source or self.dir / "model"),
                "port": port, "engine_args": ["--fake-load-s", "1", *args]}
        (self.dir / "run" / "engines" / f"{instance}.json").write_text(json.dumps(spec))
        return port

    def dropin(self, instance: str, text: str) -> None:
        # Its own file name: a drop-in named like the template's would replace it, not add to it.
        self.sandbox.install_dropin(engine_unit_name(instance), "[Service]\n" + text, name="60-instance.conf")
        self.sandbox.daemon_reload()


@pytest.fixture(scope="module")
def rig(systemd_sandbox: SystemdSandbox) -> EngineRig:
    d = systemd_sandbox.scratch
    venv_bin = d / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    vllm = venv_bin / "vllm"
    vllm.write_text(f"#!{sys.executable}\n{FAKE_VLLM}")
    vllm.chmod(0o755)
    (d / "model").mkdir()
    (d / "run" / "engines").mkdir(parents=True)
    systemd_sandbox.install_unit(UNITS / "nebula-engine@.service")
    # Test-only differences from the shipped unit, each for a reason of the sandbox, not of the product:
    # this checkout's interpreter lives under /root (so root and ProtectHome=no), test files live in a bound
    # dir under /tmp (so no PrivateTmp and that dir writable), and short timers keep the test fast.
    systemd_sandbox.install_dropin("nebula-engine@.service", f"""[Service]
ExecStart=
ExecStart={VENV_PYTHON} -m nebula engine run %i
User=root
Group=root
ProtectHome=no
PrivateTmp=no
ReadWritePaths={d}
Environment=NEBULA_CONFIG={d}/none.toml NEBULA_ENGINE_VLLM_VENV={d}/venv NEBULA_NODE_RUN_DIR={d}/run
Environment=NEBULA_ENGINE_HEALTH_INTERVAL_S=0.5 NEBULA_ENGINE_HEALTH_TIMEOUT_S=1
Environment=NEBULA_ENGINE_ALLOWED_ENGINE_ARGS=--fake-load-s,--fake-hang-marker,--fake-read,--fake-write
Environment=PYTHONPATH={REPO_ROOT}
Environment=NEBULA_ENGINE_STOP_TIMEOUT_S=5
TimeoutStartSec=20
TimeoutStopSec=10
RestartSec=0.5
""")
    systemd_sandbox.daemon_reload()
    return EngineRig(systemd_sandbox, d)


@pytest.fixture
async def units(systemd_sandbox: SystemdSandbox) -> AsyncIterator[SystemdEngineUnits]:
    u = SystemdEngineUnits(systemd_sandbox.dbus_address)
    yield u
    await u.close()


async def wait_status(units: SystemdEngineUnits, instance: str, timeout_s: float = 20.0, *,
                      until: str, sandbox: SystemdSandbox | None = None) -> UnitStatus | None:
    """Poll list() until `until` ("active", "gone", "failed", "restarted-active") holds."""
    status: UnitStatus | None = None
    for _ in range(int(timeout_s / 0.1)):
        status = (await units.list()).get(instance)
        state = status.state if status else None
        if ((until == "active" and state is UnitState.ACTIVE)
                or (until == "failed" and state is UnitState.FAILED)
                or (until == "gone" and state in (None, UnitState.INACTIVE))
                or (until == "restarted-active" and status is not None and status.restarts >= 1
                    and state is UnitState.ACTIVE)):
            return status
        await asyncio.sleep(0.1)
    log = "" if sandbox is None else sandbox.exec(
        ["journalctl", "--no-pager", "-n", "40", "-u", engine_unit_name(instance)], check=False).stdout
    raise AssertionError(f"{instance}: never {until}; last {status}\n{log}")


@pytest.mark.systemd
async def test_engine_unit_is_active_only_once_health_answers(
        rig: EngineRig, units: SystemdEngineUnits) -> None:
    port = rig.spec("alpha")
    await units.start("alpha")
    # Just after the start the fake is still "loading" (1 s): activating, and nothing answers yet.
    first = (await units.list())["alpha"]
    assert first.state is UnitState.ACTIVATING
    assert health_status(port) is None
    status = await wait_status(units, "alpha", until="active", sandbox=rig.sandbox)
    assert status is not None and status.main_pid > 0 and status.sub_state == "running"
    assert health_status(port) == 200
    assert rig.sandbox.show(engine_unit_name("alpha"), "StatusText")["StatusText"] == (
        f"serving m-alpha at http://127.0.0.1:{port}")

    await units.stop("alpha")
    await wait_status(units, "alpha", until="gone")
    assert health_status(port) is None
    await units.stop("alpha")  # stopping a stopped (unloaded) unit is fine


@pytest.mark.systemd
async def test_hung_engine_is_killed_by_the_watchdog_and_restarted(
        rig: EngineRig, units: SystemdEngineUnits) -> None:
    marker = rig.dir / "hang-beta"
    port = rig.spec("beta", args=("--fake-hang-marker", str(marker)))
    rig.dropin("beta", "WatchdogSec=2\n")
    await units.start("beta")
    await wait_status(units, "beta", until="active", sandbox=rig.sandbox)
    marker.touch()  # the supervisor's next /health check hangs the fake for good
    status = await wait_status(units, "beta", until="restarted-active", timeout_s=30,
                               sandbox=rig.sandbox)
    assert status is not None and status.restarts >= 1
    assert health_status(port) == 200
    messages = [str(r.get("MESSAGE", "")) for r in rig.sandbox.journal(engine_unit_name("beta"))]
    assert any("Watchdog timeout" in m for m in messages), messages
    await units.stop("beta")
    await wait_status(units, "beta", until="gone")


@pytest.mark.systemd
async def test_supervisor_logs_structured_fields_to_the_journal(
        rig: EngineRig, units: SystemdEngineUnits) -> None:
    rig.spec("gamma")
    await units.start("gamma")
    await wait_status(units, "gamma", until="active", sandbox=rig.sandbox)
    await units.stop("gamma")
    await wait_status(units, "gamma", until="gone")
    records = rig.sandbox.journal(engine_unit_name("gamma"))
    ours = [r for r in records if r.get("NEBULA_INSTANCE") == "gamma"]
    ready = [r for r in ours if str(r.get("MESSAGE", "")).startswith("engine ready at")]
    assert ready, records
    assert ready[0]["NEBULA_MODEL"] == "m-gamma"
    assert ready[0]["NEBULA_SERVICE"] == "engine"
    assert ready[0]["SYSLOG_IDENTIFIER"] == "nebula-engine"
    # The stop went through the supervisor: SIGTERM forwarded, vLLM drained and exited by itself.
    assert any(str(r.get("MESSAGE", "")) == "engine stopped (status 0)" for r in ours), records
    # vLLM's own stdout lands in the unit's journal too.
    assert any("fake vllm m-gamma loading" in str(r.get("MESSAGE", "")) for r in records)


@pytest.mark.systemd
async def test_missing_model_source_fails_without_a_restart_loop(
        rig: EngineRig, units: SystemdEngineUnits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.spec("delta", source=rig.dir / "no-such-model")
    await units.start("delta")
    status = await wait_status(units, "delta", until="failed", sandbox=rig.sandbox)
    assert status is not None and status.restarts == 0 and status.result == "exit-code"
    records = rig.sandbox.journal(engine_unit_name("delta"))
    errors = [r for r in records if r.get("NEBULA_INSTANCE") == "delta"]
    assert any("does not exist" in str(r.get("MESSAGE", "")) for r in errors)
    # What the agent reports as the failure's reason: the adapter's own journalctl call, against this journal
    # (the container's journalctl, reached through PATH), read down to its one line.
    rig.sandbox.command_inside("journalctl", tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    lines = await units.recent_output("delta", FAILURE_LINES)
    assert lines and all(line.strip() for line in lines), lines
    assert not any("nebula-engine@delta.service" in line for line in lines), lines  # none of systemd's own
    assert "does not exist" in error_line(lines), lines
    await units.reset("delta")
    await wait_status(units, "delta", until="gone")


@pytest.mark.systemd
async def test_an_engine_cannot_read_the_control_plane_s_credentials(
        rig: EngineRig, units: SystemdEngineUnits) -> None:
    """The shipped unit's user (nebula-engine, from the package's sysusers.d) against the files only the control
    plane may read: the admin key (0600 root) and an etcd password drop-in (0640 root:nebula). The engine still
    reads its spec and model, starts (its supervisor skips the drop-in it may not read) and cannot change its
    spec."""
    sb = rig.sandbox
    sb.exec(["systemd-sysusers", str(REPO_ROOT / "packaging/sysusers.d/nebula.conf")])
    admin_key = "/etc/nebula/admin.key"
    secret = rig.dir / "nebula.d" / "20-etcd.toml"  # beside the engines' config file ({dir}/none.toml)
    sb.exec(["sh", "-c", f"mkdir -p /etc/nebula {secret.parent} && umask 077 && echo nbk_secret > {admin_key} && "
             f"printf '[cluster]\\netcd_user = \"nebula\"\\netcd_password = \"s3cret\"\\n' > {secret} && "
             f"chown root:nebula {secret} && chmod 0640 {secret}"])
    try:
        spec = rig.dir / "run" / "engines" / "eps.json"
        port = rig.spec("eps", args=("--fake-read", admin_key, "--fake-read", str(secret),
                                     "--fake-read", str(spec), "--fake-write", str(spec)))
        # Undo the rig's test-only User=root for this instance: the unit's own user, as shipped.
        rig.dropin("eps", "User=nebula-engine\nGroup=nebula-engine\n")
        await units.start("eps")
        await wait_status(units, "eps", until="active", sandbox=sb)
        assert health_status(port) == 200
        assert sb.show(engine_unit_name("eps"), "User")["User"] == "nebula-engine"
        lines = {str(r.get("MESSAGE", "")) for r in sb.journal(engine_unit_name("eps"))}
        assert {f"fake read {admin_key}: PermissionError", f"fake read {secret}: PermissionError",
                f"fake read {spec}: ok", f"fake write {spec}: PermissionError"} <= lines, lines
        await units.stop("eps")
        await wait_status(units, "eps", until="gone")
    finally:
        sb.exec(["rm", "-f", admin_key, str(secret)], check=False)

