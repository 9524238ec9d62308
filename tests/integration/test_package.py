"""The Debian packages, one per supported release: built by scripts/build-deb.sh (each checked by its release's
lintian there), checked by systemd-analyze, and installed, started, upgraded, removed and purged with apt inside a
real systemd (the nspawn sandbox) of that release.

The .debs are built once per module (warm: about 1 minute for both, lintian included; the first build on a
machine also debootstraps the Debian 13 root, about 3 minutes, cached by date). The Debian 12 sandbox is an overlay
of this host, whatever a from-source install left there removed first; the Debian 13 one an overlay of the
debootstrapped trixie root (scripts/debian-root.sh). Either way apt adds nebula alone and changes no package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.cluster import post_json, required_path
from tests.harness.etcd import EtcdServer
from tests.harness.ports import free_port, free_port_range
from tests.harness.systemd import REPO_ROOT, SystemdSandbox, up

# Each supported release: (codename, Debian major, the Python it ships).
RELEASES = {"bookworm": (12, "3.11"), "trixie": (13, "3.13")}

pytestmark = [pytest.mark.package, pytest.mark.systemd, pytest.mark.etcd]

# Every nebula-*.service of units/ but the engine template (as scripts/build-deb.sh fills in the maintainer
# scripts): gateway, scheduler, node.
CONTROL_PLANE = tuple(sorted(p.name for p in (REPO_ROOT / "units").glob("nebula-*.service") if "@" not in p.name))


def _compiled_modules() -> tuple[str, ...]:
    """The modules the package ships compiled (scripts/compile_data_path.py's MODULES), as import names."""
    spec = importlib.util.spec_from_file_location("compile_data_path", REPO_ROOT / "scripts/compile_data_path.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return tuple(m.removesuffix(".py").replace("/", ".") for m in script.MODULES)


COMPILED = _compiled_modules()

# Debian's tools, Debian's Python: pyenv shims on PATH would otherwise win (see the packaging notes).
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", "--no-install-recommends",
       "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]


def run(argv: list[str], *, timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": DEBIAN_PATH, "LC_ALL": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False)


@dataclass(frozen=True)
class Package:
    release: str
    deb: Path
    version: str  # the package's: <upstream>+deb<N>
    tree: Path  # the .deb extracted, plus the host's base units (for systemd-analyze --root)
    build_log: str

    @property
    def upstream(self) -> str:
        return self.version.split("+deb")[0]

    @property
    def unit_dir(self) -> Path:
        # Debian 13 is merged-/usr only: units in /usr/lib; Debian 12's packages use /lib.
        return self.tree / ("lib/systemd/system" if RELEASES[self.release][0] < 13 else "usr/lib/systemd/system")

    @property
    def units(self) -> list[str]:
        return sorted(p.name for p in self.unit_dir.glob("nebula*"))


def debian_root(release: str) -> Path | None:
    """The root a release's sandbox boots: None for the host's own release, else its debootstrapped root."""
    if f"VERSION_CODENAME={release}\n" in Path("/etc/os-release").read_text():
        return None
    res = run([str(REPO_ROOT / "scripts/debian-root.sh"), release], timeout=900)
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip())


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Package]:
    out = tmp_path_factory.mktemp("deb")
    env = dict(os.environ)
    uv = shutil.which("uv")
    if uv and "UV" not in env:
        env["UV"] = uv
    t0 = time.monotonic()
    proc = subprocess.run([str(REPO_ROOT / "scripts/build-deb.sh"), "-o", str(out)], capture_output=True,
                          text=True, timeout=1200, env=env, check=False)
    assert proc.returncode == 0, f"build-deb.sh failed:\n{proc.stdout}\n{proc.stderr}"
    built = {}
    for release, (major, _) in RELEASES.items():
        debs = list(out.glob(f"nebula_*+deb{major}_amd64.deb"))
        assert len(debs) == 1, debs
        version = run(["dpkg-deb", "-f", str(debs[0]), "Version"]).stdout.strip()
        tree = tmp_path_factory.mktemp(f"tree-{release}")
        res = run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        assert res.returncode == 0, res.stderr
        built[release] = Package(release, debs[0], version, tree, proc.stderr)
        for base in Path("/lib/systemd/system").iterdir():  # systemd-analyze --root= resolves inside the tree
            if not (built[release].unit_dir / base.name).exists() and not base.is_dir():
                shutil.copy2(base, built[release].unit_dir / base.name, follow_symlinks=False)
    print(f"built {', '.join(f'{p.deb.name} ({p.deb.stat().st_size / 1e6:.1f} MB)' for p in built.values())} "
          f"in {time.monotonic() - t0:.1f} s")
    return built


@pytest.fixture(scope="module")
def package(packages: dict[str, Package]) -> Package:
    """The host's release's package (the unit checks read the same unit files in every release's)."""
    return packages["bookworm"]


@pytest.mark.parametrize("release", RELEASES)
def test_lintian_passes(packages: dict[str, Package], release: str) -> None:
    """build-deb.sh runs each release's own lintian --fail-on error,warning (Debian 13's inside its root) and
    fails the build otherwise. Every override lives in packaging/debian/lintian-overrides."""
    pkg = packages[release]
    assert re.search(rf"^build-deb: built \S*/{re.escape(pkg.deb.name)} .*\nbuild-deb: lintian v\S+: no errors or "
                     "warnings$", pkg.build_log, re.M), pkg.build_log


@pytest.mark.parametrize("release", RELEASES)
def test_package_layout(packages: dict[str, Package], release: str) -> None:
    package = packages[release]
    python = RELEASES[release][1]
    t = package.tree
    assert package.version == f"{package.upstream}+deb{RELEASES[release][0]}"
    # The venv is the release's own interpreter's (its compiled wheels are for that ABI).
    assert os.readlink(t / f"opt/nebula/venv/bin/python{python}") == f"/usr/bin/python{python}"
    assert f"version = {python}." in (t / "opt/nebula/venv/pyvenv.cfg").read_text()
    assert os.readlink(t / "usr/bin/nebula") == "/opt/nebula/venv/bin/nebula"
    assert (t / "opt/nebula/venv/bin/nebula").read_text().startswith("#!/opt/nebula/venv/bin/python\n")
    assert "/opt/nebula/venv" in (t / "opt/nebula/venv/pyvenv.cfg").read_text()
    site = t / f"opt/nebula/venv/lib/python{python}/site-packages"
    assert (site / "nebula").is_dir()
    # The compiled data path, for this release's Python, beside its sources and listed in nebula's RECORD.
    record = next(site.glob("nebula-*.dist-info")).joinpath("RECORD").read_text()
    tag = f"cpython-{python.replace('.', '')}-x86_64-linux-gnu.so"
    for name in COMPILED:
        so = site / f"{name.replace('.', '/')}.{tag}"
        assert so.is_file() and so.with_name(so.name.split(".")[0] + ".py").is_file(), so
        assert re.search(rf"^{re.escape(str(so.relative_to(site)))},sha256=", record, re.M), so
    assert not list(t.glob(f"opt/nebula/venv/lib/python{python}/site-packages/*.dist-info/direct_url.json"))
    assert not (t / "opt/nebula/venv/.gitignore").exists()
    assert not list(t.glob("opt/**/__pycache__"))
    assert {"nebula.target", "nebula-engine@.service", *CONTROL_PLANE} <= set(package.units)
    assert (t / "usr/share/polkit-1/rules.d/50-nebula.rules").is_file()
    assert (t / "usr/lib/sysusers.d/nebula.conf").is_file() and (t / "usr/lib/tmpfiles.d/nebula.conf").is_file()
    assert all((t / "etc/nebula" / d).is_dir() for d in ("nebula.d", "catalog.d", "engines"))
    conf = (t / "etc/nebula/nebula.toml").read_text()
    assert all(line.startswith(("#", "[")) or not line.strip() for line in conf.splitlines()), conf
    # The reference config and the catalog as the repository has them (etc/nebula/).
    shipped = sorted(p.name for p in (REPO_ROOT / "etc/nebula").glob("*.toml"))
    assert {"nebula.toml", "catalog.toml"} <= set(shipped)
    for name in shipped:
        assert (t / "etc/nebula" / name).read_text() == (REPO_ROOT / "etc/nebula" / name).read_text(), name
    control = run(["dpkg-deb", "-I", str(package.deb)]).stdout
    for field in ("Depends: ", f"python{python},", "systemd", "libsystemd0", "polkitd", "Recommends: etcd-server",
                  "Suggests: etcd-client, prometheus"):
        assert field in control, control
    res = run(["sh", "-c", f"dpkg-deb --ctrl-tarfile {package.deb} | tar -xO ./conffiles"])
    assert res.stdout.split() == [f"/etc/nebula/{name}" for name in shipped], res


def test_units_verify_silently(package: Package) -> None:
    names = [u.replace("@.service", "@test.service") for u in package.units]
    for name in names:
        res = run(["systemd-analyze", "verify", "--man=no", f"--root={package.tree}", name])
        # verify exits 0 on parse warnings: any output at all is a failure.
        assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), (name, res.stdout + res.stderr)


def test_control_plane_security_scores(package: Package) -> None:
    scores = {}
    for unit in CONTROL_PLANE:
        res = run(["systemd-analyze", "security", "--offline=yes", f"--root={package.tree}", "--no-pager", unit])
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout + res.stderr)
        assert m, res.stdout + res.stderr
        scores[unit] = float(m.group(1))
    print("systemd-analyze security:", scores)
    assert all(score <= 2.0 for score in scores.values()), scores


# --- apt install / start / upgrade / remove / purge under a real systemd -----------------------------------


@dataclass
class Box:
    sb: SystemdSandbox

    def sh(self, script: str, *, check: bool = True, timeout: float = 120.0) -> str:
        return self.sb.exec(["sh", "-c", script], check=check, timeout=timeout).stdout

    def apt(self, *args: str) -> str:
        return self.sb.exec([*APT, *args], timeout=300).stdout

    def state(self, unit: str) -> tuple[str, int]:
        props = self.sb.show(unit, "ActiveState", "MainPID")
        return props.get("ActiveState", ""), int(props.get("MainPID", "0") or 0)

    def logs(self) -> str:
        return self.sh("journalctl --no-pager -n 80 -u 'nebula*'", check=False)

    def wait_active(self, units: tuple[str, ...], timeout: float = 30.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            states = {u: self.state(u) for u in units}
            if all(s == "active" for s, _ in states.values()):
                return {u: pid for u, (_, pid) in states.items()}
            assert time.monotonic() < deadline, f"not active: {states}\n{self.logs()}"
            time.sleep(0.3)


    def versions(self) -> dict[str, str]:
        """Every installed package's version (dpkg-query -W), by name."""
        out = self.sh("dpkg-query -W -f='${db:Status-Abbrev}|${Package}|${Version}\\n'")
        return {name: version for abbrev, name, version in (line.split("|") for line in out.splitlines())
                if abbrev.startswith("ii")}


@contextmanager
def boot(release: str) -> Iterator[Box]:
    """A real systemd of `release`: an overlay of the host (its own release) or of the release's root."""
    sb = up(name=f"pkg{RELEASES[release][0]}-{os.getpid()}", lower=debian_root(release))
    try:
        yield Box(sb)
    finally:
        sb.systemctl("stop", "nebula.target", "nebula-*.service", check=False)
        sb.down()


@pytest.fixture
def box() -> Iterator[Box]:
    with boot("bookworm") as b:
        yield b


def repack(deb: Path, out: Path, version: str) -> Path:
    """The same package at a higher version whose conffile changed: a real upgrade with a conffile decision."""
    tree = out / "tree"
    assert run(["dpkg-deb", "-R", str(deb), str(tree)]).returncode == 0
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    with (tree / "etc/nebula/nebula.toml").open("a") as f:
        f.write("## (a setting documented in the newer release)\n")
    new = out / f"nebula_{version}_amd64.deb"
    res = run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(tree), str(new)])
    assert res.returncode == 0, res.stderr
    return new


@pytest.mark.parametrize("release", RELEASES)
def test_apt_install_start_upgrade_remove_purge(packages: dict[str, Package], release: str,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    etcd = EtcdServer.launch(tmp_path_factory.mktemp("pkg-etcd"))
    try:
        with boot(release) as box:
            _lifecycle(packages[release], box, etcd, tmp_path_factory.mktemp("repack"))
    finally:
        etcd.stop()


def _lifecycle(package: Package, box: Box, etcd: EtcdServer, work: Path) -> None:
    sb = box.sb
    # A machine without Nebula: drop what a from-source install left on the host (overlay: only in here), and
    # the container image's policy-rc.d, which forbids maintainer scripts to start or stop anything.
    box.sh("rm -rf /opt/nebula/venv /usr/bin/nebula /usr/local/bin/nebula /etc/nebula /var/lib/nebula "
           "/var/cache/nebula /run/nebula /etc/systemd/system/nebula* /etc/polkit-1/rules.d/50-nebula.rules "
           "/usr/sbin/policy-rc.d; if getent passwd nebula >/dev/null; then userdel nebula; fi")
    debs = sb.scratch / "debs"
    debs.mkdir()
    deb = debs / package.deb.name
    shutil.copy2(package.deb, deb)
    newer = repack(package.deb, work, package.version + "+test1")
    shutil.copy2(newer, debs / newer.name)
    newer = debs / newer.name
    # Settings of this test in a drop-in (the packaged nebula.toml stays as shipped): the host's etcd, free
    # ports (the sandbox shares the host's network).
    ports = {u: free_port() for u in CONTROL_PLANE}
    engine_base = free_port_range(20)
    dropin = sb.root / "etc/nebula/nebula.d/10-test.toml"
    dropin.parent.mkdir(parents=True)
    sections: dict[str, dict[str, object]] = {"cluster": {"etcd_endpoints": [etcd.endpoint]}}
    for unit, port in ports.items():
        sections[unit.removeprefix("nebula-").removesuffix(".service")] = {"port": port}
    sections["node"].update(name="pkg-node", port_min=engine_base, port_max=engine_base + 19)
    dropin.write_text("".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        for name, values in sections.items()))

    # --- install -------------------------------------------------------------------------------------------
    # Installing Nebula adds nebula and changes no package that was there (no upgrade, no replacement).
    before = box.versions()
    rules_dir = box.sh("stat -c '%U %a' /usr/share/polkit-1/rules.d").strip()  # polkitd's (its release's mode)
    box.apt("install", str(deb))
    installed = box.versions()
    assert {p: (v, installed.get(p)) for p, v in before.items() if installed.get(p) != v} == {}
    assert set(installed) - set(before) == {"nebula"}, set(installed) - set(before)
    assert box.sh("/usr/bin/nebula --version").strip() == f"nebula {package.upstream}"
    # The gateway's data path runs compiled (scripts/compile_data_path.py): the venv loads the extension modules.
    load = "import importlib, sys\nfor n in sys.argv[1:]: print(importlib.import_module(n).__file__)"
    loaded = box.sh(f"/opt/nebula/venv/bin/python -I -c {shlex.quote(load)} {' '.join(COMPILED)}").split()
    assert len(loaded) == len(COMPILED) and all(f.endswith(".so") for f in loaded), loaded
    assert box.sh("getent passwd nebula").strip().split(":")[5:] == ["/var/lib/nebula", "/usr/sbin/nologin"]
    assert box.sh("stat -c '%U %a' /var/lib/nebula /run/nebula").split("\n")[:2] == ["nebula 755", "nebula 755"]
    for unit in ("nebula.target", *CONTROL_PLANE):
        assert box.sh(f"systemctl is-enabled {unit}").strip() == "enabled", unit
    # A fresh install starts nothing: the admin points it at etcd first.
    assert all(box.state(u)[0] == "inactive" for u in CONTROL_PLANE)
    # polkitd's rules directory keeps its owner and mode.
    assert box.sh("stat -c '%U %a' /usr/share/polkit-1/rules.d").strip() == rules_dir
    assert box.sh("find /opt/nebula/venv -name '*.pyc' | head -1").strip()  # postinst byte-compiled the venv

    sb.systemctl("start", "nebula.target")
    pids = box.wait_active(CONTROL_PLANE)
    assert sb.show("nebula-gateway.service", "User")["User"] == "nebula"
    # The bootstrap admin key: the token is root's, the gateway (User=nebula) reads only its digest; the CLI,
    # as root, uses the token by default, and without it the admin API refuses.
    modes = box.sh("stat -c '%U %G %a' /etc/nebula/admin.key /etc/nebula/admin.key.sha256").split("\n")[:2]
    assert modes == ["root root 600", "root nebula 640"], modes
    assert isinstance(json.loads(box.sh("nebula list --json")), list)
    # `nebula status` says healthy (exit 0) once the node agent has registered.
    deadline = time.monotonic() + 30
    while (res := sb.exec(["nebula", "status"], check=False)).returncode != 0:
        assert time.monotonic() < deadline, f"nebula status: {res.returncode}\n{res.stdout}{res.stderr}\n{box.logs()}"
        time.sleep(0.5)
    refused = box.sh("NEBULA_ADMIN_KEY_FILE=/nonexistent nebula list 2>&1; echo rc=$?", check=False)
    assert "missing API key" in refused and "rc=1" in refused, refused

    # --- upgrade with an admin-edited conffile (non-interactive: confold keeps the admin's version) ----------
    conf = sb.root / "etc/nebula/nebula.toml"
    conf.write_text(conf.read_text() + "# edited by the admin\n")
    box.apt("install", str(newer))
    assert box.sh("dpkg-query -W -f='${Version}' nebula") == package.version + "+test1"
    assert conf.read_text().endswith("# edited by the admin\n")
    assert (sb.root / "etc/nebula/nebula.toml.dpkg-dist").exists()
    after = box.wait_active(CONTROL_PLANE)
    assert all(after[u] != pids[u] for u in CONTROL_PLANE), (pids, after)  # every control-plane unit restarted

    # --- an upgrade never touches an engine ----------------------------------------------------------------
    # A stand-in engine instance (no vLLM here): the real unit with its command replaced. The agent would stop
    # it as an orphan, so it is stopped first; try-restart leaves a stopped unit stopped.
    sb.systemctl("stop", "nebula-node.service")
    sb.install_dropin("nebula-engine@fake.service",
                      "[Service]\nType=simple\nWatchdogSec=0\nExecStart=\nExecStart=/bin/sleep infinity\n")
    sb.daemon_reload()
    sb.systemctl("start", "nebula-engine@fake.service")
    sb.systemctl("add-wants", "nebula.target", "nebula-engine@fake.service")  # an admin-made instance link
    engine = box.state("nebula-engine@fake.service")
    assert engine[0] == "active"
    box.apt("install", "--reinstall", str(newer))
    assert box.state("nebula-engine@fake.service") == engine
    assert box.state("nebula-node.service")[0] == "inactive"
    box.wait_active(tuple(u for u in CONTROL_PLANE if u != "nebula-node.service"))

    # --- remove: everything stops (the engine too), configuration stays ---------------------------------------
    box.apt("remove", "nebula")
    states = {u: box.state(u)[0] for u in (*CONTROL_PLANE, "nebula.target", "nebula-engine@fake.service")}
    assert set(states.values()) == {"inactive"}, states
    assert not (sb.root / "usr/bin/nebula").exists() and not (sb.root / "opt/nebula/venv").exists()
    assert conf.exists() and dropin.exists()

    # --- purge: configuration and engine instance links go, the user stays ----------------------------------
    box.apt("purge", "nebula")
    assert not (sb.root / "etc/nebula").exists()
    assert not (sb.root / "var/lib/nebula").exists()
    assert box.sh("find /etc/systemd/system -name 'nebula*' ! -name '*.service.d'").strip() == ""
    status = box.sh("dpkg-query -W -f='${db:Status-Status}' nebula 2>/dev/null || echo absent").strip()
    assert status in ("absent", "not-installed"), status
    assert box.sh("getent passwd nebula || true").startswith("nebula:")
    assert box.versions() == before  # nothing of the machine's own packages changed, first to last


# --- one engine by hand, from the installed package, with no control plane ----------------------------------


@pytest.mark.engine
def test_hand_run_engine_serves_a_model_with_no_control_plane(package: Package, box: Box) -> None:
    """`systemctl start nebula-engine@tiny` on a box with only the package and /etc/nebula/engines/tiny.toml:
    real vLLM starts as User=nebula-engine under the shipped hardening, answers chat, logs to its unit's journal."""
    venv, models = required_path("NEBULA_TEST_VLLM_VENV"), required_path("NEBULA_TEST_MODELS")
    box.sh("rm -rf /opt/nebula/venv /usr/bin/nebula /usr/local/bin/nebula /etc/nebula /var/lib/nebula "
           "/var/cache/nebula /run/nebula /etc/systemd/system/nebula* /usr/sbin/policy-rc.d; "
           "for u in nebula nebula-engine; do if getent passwd $u >/dev/null; then userdel $u; fi; done")
    debs = box.sb.scratch / "debs"
    debs.mkdir(exist_ok=True)
    shutil.copy2(package.deb, debs / package.deb.name)
    box.apt("install", str(debs / package.deb.name))
    port = free_port()
    engines = box.sb.root / "etc/nebula/engines"
    (engines / "tiny.toml").write_text(f'source = "{models}/tiny-llama"\nport = {port}\nmax_model_len = 512\n')
    (box.sb.root / "etc/nebula/nebula.d/10-test.toml").write_text(
        f'[engine]\nvllm_venv = "{venv}"\nvllm_device = "cpu"\n')
    box.sb.systemctl("start", "--no-block", "nebula-engine@tiny.service")
    deadline = time.monotonic() + 420
    while (state := box.state("nebula-engine@tiny.service")[0]) != "active":
        assert state in ("activating", "active"), f"engine {state}:\n{box.logs()}"
        assert time.monotonic() < deadline, f"engine not ready in 420 s:\n{box.logs()}"
        time.sleep(2)
    status = box.sb.show("nebula-engine@tiny.service", "StatusText", "User")
    assert status["User"] == "nebula-engine", status
    assert box.state("nebula-gateway.service")[0] == "inactive"  # no control plane involved
    code, answer = post_json(f"http://127.0.0.1:{port}/v1/chat/completions",
                             {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert code == 200 and answer["choices"], answer
    journal = box.sh("journalctl --no-pager -o cat -u nebula-engine@tiny.service")
    assert "Application startup complete" in journal or "Starting vLLM" in journal, journal[-3000:]
    box.sb.systemctl("stop", "nebula-engine@tiny.service")
    assert box.state("nebula-engine@tiny.service") == ("inactive", 0)
    assert box.sh("pgrep -u nebula -f 'vllm serve' || true").strip() == ""
