"""`nebula logs [MODEL|INSTANCE|SERVICE] [-f] [-n N] [--since T] [--node N] [--remote | --directory D]`.

Under systemd it runs journalctl on the matching units; without systemd (`nebula up` in process mode) it
tails the log files the launcher and the agent write. Logs shipped from other nodes with
systemd-journal-upload land on the collector in REMOTE_DIR (docs/observability.md): `--remote` reads those.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nebula.cli.client import EXIT_NOT_FOUND, EXIT_USAGE, CliError
from nebula.core.config import NebulaConfig
from nebula.core.engine_logs import engine_units, is_model_instance

SERVICES = ("gateway", "scheduler", "node")
REMOTE_DIR = "/var/log/journal/remote"
SERVICE_LOG_DIR = Path("/var/log/nebula")
# `10m`, `2h`, `1d`: journalctl wants `-10m` (or `10m ago`); accept the short form people type.
_BARE_DURATION = re.compile(r"^\d+(s|sec|m|min|h|d|w)$")


@dataclass(frozen=True)
class LogQuery:
    target: str = ""
    follow: bool = False
    lines: int = 100
    since: str = ""
    node: str = ""
    directory: str = ""


def journal_units(target: str) -> list[str]:
    """The units whose journal `target` names: a service, a model (every replica), one instance, or a unit."""
    if not target:
        return ["nebula-*"]
    if target in SERVICES:
        return [f"nebula-{target}.service"]
    if target.startswith("nebula-"):
        return [target]
    if ":" in target:
        return [f"nebula-engine@{target}.service"]
    return engine_units(target)  # what the console's log tail reads too (core/engine_logs.py)


def journal_since(since: str) -> str:
    return f"-{since}" if _BARE_DURATION.match(since) else since


def journal_argv(q: LogQuery) -> list[str]:
    argv = ["journalctl", "--no-pager", "-n", str(q.lines)]
    if q.directory:
        argv.append(f"--directory={q.directory}")
    if q.since:
        argv.append(f"--since={journal_since(q.since)}")
    if q.node:
        # The journal's own host field: true for local entries and for those shipped by journal-upload.
        argv.append(f"_HOSTNAME={q.node}")
    for unit in journal_units(q.target):
        argv += ["-u", unit]
    if q.follow:
        argv.append("-f")
    return argv


def logs(config: Callable[[], NebulaConfig], q: LogQuery, *, systemd: bool | None = None) -> int:
    if q.lines < 0:
        raise CliError("-n must be 0 or more", EXIT_USAGE)
    if systemd is None:
        systemd = Path("/run/systemd/system").is_dir()
    if systemd or q.directory:
        if q.directory and not Path(q.directory).is_dir():
            raise CliError(f"{q.directory} does not exist: no journals were shipped here (set up "
                           "systemd-journal-remote on this machine: docs/observability.md)", EXIT_NOT_FOUND)
        try:
            return subprocess.call(journal_argv(q))
        except FileNotFoundError:
            raise CliError("journalctl not found (apt-get install systemd)", EXIT_NOT_FOUND) from None
        except KeyboardInterrupt:
            return 0
    cfg = config()
    if q.since or q.node:
        raise CliError("--since and --node need the journal; without systemd the logs are plain files in "
                       f"{SERVICE_LOG_DIR} and {cfg.node.state_dir}/logs (use -n)", EXIT_USAGE)
    files = log_files(SERVICE_LOG_DIR, Path(cfg.node.state_dir) / "logs", q.target)
    if not files:
        raise CliError(f"no logs found for {q.target or 'nebula'} (looked in {SERVICE_LOG_DIR} and "
                       f"{cfg.node.state_dir}/logs)", EXIT_NOT_FOUND)
    argv = ["tail", "-n", str(q.lines)] + (["-F"] if q.follow else []) + [str(f) for f in files]
    os.execvp("tail", argv)
    return 0  # not reached


def log_files(svc_dir: Path, engine_dir: Path, target: str) -> list[Path]:
    """Without systemd: the launcher's <service>.log files and the agent's <instance>.log engine files."""
    if target in SERVICES:
        return [p for p in [svc_dir / f"{target}.log"] if p.exists()]
    if target.startswith("nebula-"):
        target = target.removeprefix("nebula-engine@").removesuffix(".service").removeprefix("nebula-")
        if target in SERVICES:
            return log_files(svc_dir, engine_dir, target)
    if not target:
        return sorted(svc_dir.glob("*.log")) + sorted(engine_dir.glob("*.log"))
    if ":" in target:
        return [p for p in [engine_dir / f"{target}.log"] if p.exists()]
    return sorted(p for p in engine_dir.glob("*.log") if is_model_instance(p.stem, target))
