"""scripts/quickstart.sh on each supported release, in a real systemd of that release (the nspawn sandbox: Debian 12
an overlay of this host, Debian 13 an overlay of the debootstrapped trixie root), control plane only
(NEBULA_QUICKSTART_ENGINE=0: the engine runtime is several GB; tests/integration/test_package.py and the engine
tests cover engines). It installs etcd from the release's archive and the control plane from the public index,
brings Nebula up under systemd, and `nebula status` is healthy; no package the machine had changes version.

The sandbox shares the host's network, so etcd and Nebula get free ports through drop-ins made before the
quickstart runs (an etcd.service drop-in, /etc/nebula/nebula.d/20-test.toml), which it leaves alone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.harness.ports import free_port, free_port_range
from tests.harness.systemd import REPO_ROOT
from tests.integration.test_package import CONTROL_PLANE, RELEASES, boot

pytestmark = [pytest.mark.package, pytest.mark.systemd]

# What an operator's shell has: no pip/uv settings of this machine (its local wheel directory and index files).
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LC_ALL=C.UTF-8",
             "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt", "NEBULA_QUICKSTART_ENGINE=0"]


def checkout_copy(dest: Path) -> Path:
    """The working tree without its venv, VCS data and build outputs (a fresh clone's content)."""
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "dist", "build", "*.egg-info", ".mypy_cache",
                                    ".ruff_cache", ".hypothesis")
    return Path(shutil.copytree(REPO_ROOT, dest / "nebula-src", ignore=ignore))


@pytest.mark.parametrize("release", RELEASES)
def test_quickstart_control_plane(release: str, tmp_path: Path) -> None:
    with boot(release) as box:
        sb = box.sb
        # A machine without Nebula (the Debian 12 sandbox shows this host's from-source install otherwise).
        box.sh("rm -rf /opt/nebula /usr/bin/nebula /usr/local/bin/nebula /etc/nebula /var/lib/nebula "
               "/etc/systemd/system/nebula* /etc/polkit-1/rules.d/50-nebula.rules; "
               "for u in nebula nebula-engine; do if getent passwd $u >/dev/null; then userdel $u; fi; done")
        # This network's trust store (a proxy's CA where there is one), as an operator's machine would have it.
        shutil.copy2("/etc/ssl/certs/ca-certificates.crt", sb.root / "etc/ssl/certs/ca-certificates.crt")
        src = checkout_copy(sb.scratch)
        etcd_port, peer_port = free_port(), free_port()
        sb.install_dropin("etcd.service", "[Service]\n" + "".join(f"Environment={k}={v}\n" for k, v in {
            "ETCD_LISTEN_CLIENT_URLS": f"http://127.0.0.1:{etcd_port}",
            "ETCD_ADVERTISE_CLIENT_URLS": f"http://127.0.0.1:{etcd_port}",
            "ETCD_LISTEN_PEER_URLS": f"http://127.0.0.1:{peer_port}",
            "ETCD_INITIAL_ADVERTISE_PEER_URLS": f"http://127.0.0.1:{peer_port}",
            "ETCD_NAME": "%H",  # (Debian's unit names the member after the host, %H)
            "ETCD_INITIAL_CLUSTER": f"%H=http://127.0.0.1:{peer_port}",
            "ETCD_DATA_DIR": "/var/lib/etcd/nebula-test"}.items()))
        sb.daemon_reload()
        engine_base = free_port_range(20)
        sections: dict[str, dict[str, object]] = {"cluster": {"etcd_endpoints": [f"http://127.0.0.1:{etcd_port}"]}}
        for unit in CONTROL_PLANE:
            sections[unit.removeprefix("nebula-").removesuffix(".service")] = {"port": free_port()}
        sections["node"].update(port_min=engine_base, port_max=engine_base + 19)
        dropin = sb.root / "etc/nebula/nebula.d/20-test.toml"
        dropin.parent.mkdir(parents=True)
        dropin.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                                  for name, values in sections.items()))

        before = box.versions()
        t0 = time.monotonic()
        run = sb.exec([*CLEAN_ENV, str(src / "scripts/quickstart.sh")], check=False, timeout=900)
        took = time.monotonic() - t0
        etcd_log = box.sh("journalctl --no-pager -n 30 -u etcd", check=False)
        assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-4000:]}\n{box.logs()}\n{etcd_log}"
        print(f"quickstart (control plane) on {release}: {took:.0f} s")
        assert "The control plane is up" in run.stdout, run.stdout[-3000:]
        after = box.versions()
        assert {p: (v, after.get(p)) for p, v in before.items() if after.get(p) != v} == {}
        assert set(after) - set(before) <= {"etcd-server", "python3-pip"}, set(after) - set(before)

        box.wait_active((*CONTROL_PLANE, "etcd.service"))
        deadline = time.monotonic() + 30
        while (res := sb.exec(["nebula", "status"], check=False)).returncode != 0:
            assert time.monotonic() < deadline, f"nebula status {res.returncode}:\n{res.stdout}{res.stderr}"
            time.sleep(0.5)
        assert "healthy" in res.stdout, res.stdout
        python = RELEASES[release][1]
        assert box.sh("readlink -f /opt/nebula/venv/bin/python").strip() == f"/usr/bin/python{python}"
        assert os.path.isfile(sb.root / "etc/nebula/admin.key")
        # A GPU node of this release takes the GPU lock compiled for its Python (the install itself is several GB).
        gpu = sb.exec([*CLEAN_ENV, str(src / "scripts/install-engine.sh"), "--runtime", "gpu", "--dry-run"],
                      check=False, timeout=60)
        assert gpu.returncode == 0, gpu.stdout + gpu.stderr
        choice = dict(line.split("=", 1) for line in gpu.stdout.splitlines())
        assert choice["lock"] == f"{src}/packaging/engine/vllm-gpu-py{python.replace('.', '')}.lock", choice
        assert choice["runtime"] == "vllm-0.32-cu13", choice
        # A rerun is safe and quick, and still changes nothing of the machine's packages.
        again = sb.exec([*CLEAN_ENV, str(src / "scripts/quickstart.sh")], check=False, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert box.versions() == after
        sb.systemctl("stop", "nebula.target", "etcd.service", check=False)
