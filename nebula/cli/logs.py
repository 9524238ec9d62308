"""`nebula logs`: the journal of a model's engine units or of a service; log files without systemd."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from nebula.cli.client import CliError
from nebula.core.config import NebulaConfig

SERVICES = ("gateway", "scheduler", "node")


def journal_units(target: str) -> list[str]:
    if not target:
        return ["nebula-*"]
    if target in SERVICES:
        return [f"nebula-{target}.service"]
    # replica 0 is nebula-engine@<model>, the others nebula-engine@<model>:<n>
    return [f"nebula-engine@{target}.service", f"nebula-engine@{target}:*.service"]


def logs(cfg: NebulaConfig, target: str, *, follow: bool, lines: int) -> int:
    if Path("/run/systemd/system").is_dir():
        argv = ["journalctl", "--no-pager", "-n", str(lines)]
        for unit in journal_units(target):
            argv += ["-u", unit]
        if follow:
            argv.append("-f")
        return subprocess.call(argv)
    files = _log_files(cfg, target)
    if not files:
        raise CliError(f"no logs found for {target or 'nebula'} (looked in /var/log/nebula and "
                       f"{cfg.node.state_dir}/logs)")
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(f) for f in files]
    os.execvp("tail", argv)
    return 0  # not reached


def _log_files(cfg: NebulaConfig, target: str) -> list[Path]:
    svc_dir = Path("/var/log/nebula")
    engine_dir = Path(cfg.node.state_dir) / "logs"
    if target in SERVICES:
        return [p for p in [svc_dir / f"{target}.log"] if p.exists()]
    if not target:
        return sorted(svc_dir.glob("*.log")) + sorted(engine_dir.glob("*.log"))
    return sorted(p for p in engine_dir.glob("*.log") if p.stem == target or p.stem.startswith(target + ":"))
