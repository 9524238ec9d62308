"""A real systemd (PID 1 of an nspawn container) for integration tests, over scripts/systemd-sandbox.sh.

`up(binds)` boots it (about 1 s) and returns a `SystemdSandbox`: `.exec(argv)` runs a command inside,
`.root` is the container's file tree seen from the host, `.dbus_address` its system bus (for
$DBUS_SYSTEM_BUS_ADDRESS), `.install_unit()` / `.install_dropin()` + `.daemon_reload()` manage units,
`.journal(unit)` reads the journal as JSON records, `.down()` tears everything down.

The container has its own /tmp: files shared with units must live under a bound path; `.scratch` is one,
made fresh per sandbox and removed by `down()`. Its TCP ports are the host's (shared network namespace).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "systemd-sandbox.sh"
_UP_TIMEOUT_S = 90.0
_DOWN_TIMEOUT_S = 60.0


class SandboxError(RuntimeError):
    pass


def _read_env(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


class SystemdSandbox:
    def __init__(self, name: str, env: dict[str, str], scratch: Path) -> None:
        self.name = name
        self.leader = int(env["SDCI_LEADER"])
        self.root = Path(env["SDCI_ROOT"])
        self.dbus_address = env["SDCI_DBUS"]
        self.scratch = scratch
        self._exec_path = env["SDCI_EXEC"]

    def exec(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the container (its namespaces: its systemd, journal, /tmp, pids)."""
        proc = subprocess.run([self._exec_path, *argv], capture_output=True, text=True, timeout=timeout,
                              input=input, cwd="/", check=False)
        if check and proc.returncode != 0:
            raise SandboxError(f"{' '.join(argv)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def command_inside(self, name: str, into: Path) -> Path:
        """A script `into/name` that runs the container's `name` with its arguments (in its namespaces): with
        `into` first on PATH, code on the host that runs `name` (journalctl) reaches the container's instead."""
        script = into / name
        script.write_text(f'#!/bin/sh\nexec {self._exec_path} {name} "$@"\n')
        script.chmod(0o755)
        return script

    @property
    def unit_dir(self) -> Path:
        return self.root / "etc" / "systemd" / "system"

    def install_unit(self, unit: Path | str, name: str | None = None) -> str:
        """Install a unit file (a path, or the text with `name`); returns its name. Call daemon_reload()."""
        if isinstance(unit, Path):
            text, name = unit.read_text(), name or unit.name
        elif name is None:
            raise ValueError("install_unit(text) needs name=")
        else:
            text = unit
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        (self.unit_dir / name).write_text(text)
        return name

    def install_dropin(self, unit: str, text: str, name: str = "50-test.conf") -> Path:
        """A drop-in for `unit` (a template, `nebula-engine@.service`, or one instance)."""
        d = self.unit_dir / f"{unit}.d"
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        path.write_text(text)
        return path

    def daemon_reload(self) -> None:
        self.exec(["systemctl", "daemon-reload"])

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec(["systemctl", *args], check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.exec(["systemctl", "show", unit, "--property=" + ",".join(props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *extra: str) -> list[dict[str, Any]]:
        """Journal records (journalctl -o json) of `unit`, or all with None; flushes stream buffers first."""
        self.exec(["journalctl", "--sync"], check=False)
        argv = ["journalctl", "--no-pager", "-o", "json", *extra]
        if unit is not None:
            argv += ["-u", unit]
        out = self.exec(argv, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def down(self) -> None:
        try:
            subprocess.run([str(SCRIPT), "down", self.name], capture_output=True, text=True,
                           timeout=_DOWN_TIMEOUT_S, check=True)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)


def up(binds: Sequence[Path | str] = (), name: str | None = None, lower: Path | None = None) -> SystemdSandbox:
    """Boot a sandbox binding `binds` (plus a fresh scratch dir) read-write at the same paths; its files are an
    overlay of `lower` (a debootstrapped root of another release: scripts/debian-root.sh), default the host's /."""
    name = name or f"pytest-{os.getpid()}"
    env = {**os.environ, "SDCI_LOWER": str(lower)} if lower is not None else None
    scratch = Path(tempfile.mkdtemp(prefix=f"nebula-sdci-share-{name}-"))
    scratch.chmod(0o755)
    paths = [str(Path(b).resolve()) for b in binds] + [str(scratch)]
    proc = subprocess.run([str(SCRIPT), "up", name, *paths], capture_output=True, text=True,
                          timeout=_UP_TIMEOUT_S, check=False, env=env)
    if proc.returncode != 0:
        subprocess.run([str(SCRIPT), "down", name], capture_output=True, timeout=_DOWN_TIMEOUT_S, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        raise SandboxError(f"systemd-sandbox up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    env = _read_env(Path(f"/tmp/nebula-sdci-{name}/env"))
    return SystemdSandbox(name, env, scratch)
