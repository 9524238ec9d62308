"""SystemdEngineUnits.recent_output: an engine's last journal lines, read with journalctl (a stand-in script on
PATH here, a real process), and a journalctl that hangs is killed at the call's deadline, not left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nebula.adapters.systemd import SystemdEngineUnits


def _journalctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    exe = tmp_path / "journalctl"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


async def test_the_units_lines_come_back_without_blank_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _journalctl(tmp_path, monkeypatch, f'echo "$@" > {tmp_path}/args\nprintf "loading\\n\\n  \\nOOM at step 3\\n"\n')
    units = SystemdEngineUnits(call_timeout_s=5.0)
    assert await units.recent_output("qwen-0", 20) == ["loading", "OOM at step 3"]
    assert (tmp_path / "args").read_text().split() == [
        "--no-pager", "-q", "-o", "cat", "-n", "20", "_SYSTEMD_UNIT=nebula-engine@qwen-0.service"]


async def test_a_journalctl_that_hangs_is_killed_at_the_deadline(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _journalctl(tmp_path, monkeypatch, f"echo $$ > {tmp_path}/pid\nexec sleep 30\n")
    units = SystemdEngineUnits(call_timeout_s=0.3)
    started = time.monotonic()
    assert await units.recent_output("qwen-0", 20) == []
    assert time.monotonic() - started < 5
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: not even a zombie is left


async def test_no_journalctl_gives_no_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    assert await SystemdEngineUnits(call_timeout_s=1.0).recent_output("qwen-0", 20) == []
