"""`nebula logs`: which journal entries or log files a target names (the journal itself: test_log_shipping)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nebula.cli.client import CliError
from nebula.cli.logs import LogQuery, journal_argv, journal_since, journal_units, log_files, logs
from nebula.core.config import NebulaConfig, NodeConfig


@pytest.mark.parametrize(("target", "units"), [
    ("", ["nebula-*"]),
    ("gateway", ["nebula-gateway.service"]),
    ("node", ["nebula-node.service"]),
    ("qwen", ["nebula-engine@qwen.service", "nebula-engine@qwen:*.service"]),
    ("qwen:2", ["nebula-engine@qwen:2.service"]),
    ("nebula-engine@qwen.service", ["nebula-engine@qwen.service"]),
])
def test_journal_units(target: str, units: list[str]) -> None:
    assert journal_units(target) == units


@pytest.mark.parametrize(("since", "passed"), [("10m", "-10m"), ("2h", "-2h"), ("1d", "-1d"), ("30min", "-30min"),
                                               ("today", "today"), ("2025-01-31 12:00", "2025-01-31 12:00"),
                                               ("-5m", "-5m"), ("1h ago", "1h ago")])
def test_since_accepts_the_short_form(since: str, passed: str) -> None:
    assert journal_since(since) == passed


def test_journal_argv() -> None:
    assert journal_argv(LogQuery("qwen", follow=True, lines=20, since="10m", node="gpu2",
                                 directory="/var/log/journal/remote")) == [
        "journalctl", "--no-pager", "-n", "20", "--directory=/var/log/journal/remote", "--since=-10m",
        "_HOSTNAME=gpu2", "-u", "nebula-engine@qwen.service", "-u", "nebula-engine@qwen:*.service", "-f"]
    assert journal_argv(LogQuery("scheduler")) == ["journalctl", "--no-pager", "-n", "100", "-u",
                                                   "nebula-scheduler.service"]


def test_log_files_without_systemd(tmp_path: Path) -> None:
    svc, eng = tmp_path / "svc", tmp_path / "eng"
    svc.mkdir()
    eng.mkdir()
    for f in (svc / "gateway.log", svc / "node.log", eng / "qwen.log", eng / "qwen:1.log", eng / "qwen2.log"):
        f.write_text("x\n")
    assert log_files(svc, eng, "gateway") == [svc / "gateway.log"]
    assert log_files(svc, eng, "nebula-gateway.service") == [svc / "gateway.log"]
    assert log_files(svc, eng, "scheduler") == []
    assert log_files(svc, eng, "qwen") == [eng / "qwen.log", eng / "qwen:1.log"]
    assert log_files(svc, eng, "qwen:1") == [eng / "qwen:1.log"]
    assert log_files(svc, eng, "nebula-engine@qwen:1.service") == [eng / "qwen:1.log"]
    assert len(log_files(svc, eng, "")) == 5


def test_without_systemd_journal_options_are_usage_errors(tmp_path: Path) -> None:
    cfg = NebulaConfig(node=NodeConfig(state_dir=str(tmp_path)))
    with pytest.raises(CliError) as e:
        logs(lambda: cfg, LogQuery("qwen", since="10m"), systemd=False)
    assert e.value.code == 2 and "need the journal" in str(e.value)
    with pytest.raises(CliError) as e:
        logs(lambda: cfg, LogQuery("nosuchmodel"), systemd=False)
    assert e.value.code == 3 and "no logs found for nosuchmodel" in str(e.value)
    with pytest.raises(CliError) as e:
        logs(lambda: cfg, LogQuery("qwen", directory=str(tmp_path / "remote")), systemd=False)
    assert e.value.code == 3 and "systemd-journal-remote" in str(e.value)
