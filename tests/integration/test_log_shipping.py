"""Log shipping with journald's own tools, as docs/observability.md sets it up, in a REAL systemd (the nspawn
sandbox): the shipped etc/systemd/ files installed as they are (only the collector's address filled in),
systemd-journal-remote receiving over HTTP, systemd-journal-upload sending. A Nebula log line with its
structured fields, written while the collector is still down, lands in the collector's remote journal with
those fields, and `nebula logs MODEL --remote --node HOST` shows it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.ports import free_port
from tests.harness.systemd import REPO_ROOT, SystemdSandbox, up

pytestmark = pytest.mark.systemd

SHIPPED = REPO_ROOT / "etc" / "systemd"
PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
REMOTE_DIR = "/var/log/journal/remote"

# A Nebula process logging through logsetup (JournalHandler under systemd), as the engine supervisor does.
LOG_LINE = """\
import logging, os, sys
from nebula.services.logsetup import setup_logging
setup_logging("engine", "info", os.environ)
logging.getLogger("nebula.test").info("shipped %s", sys.argv[1],
                                      extra={"NEBULA_MODEL": "shipmodel", "NEBULA_INSTANCE": "shipmodel:1"})
"""


@pytest.fixture(scope="module")
def box() -> Iterator[SystemdSandbox]:
    # A sandbox of its own: journal-upload would otherwise ship every other test's journal too.
    sandbox = up([REPO_ROOT], name=f"logship-{os.getpid()}")
    try:
        yield sandbox
    finally:
        sandbox.down()


def install_shipped(box: SystemdSandbox, port: int) -> None:
    for src in SHIPPED.rglob("*.conf"):
        dst = box.root / "etc" / "systemd" / src.relative_to(SHIPPED)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    upload = box.root / "etc/systemd/journal-upload.conf.d/50-nebula.conf"
    text = upload.read_text()
    assert "http://nebula-logs:19532" in text
    upload.write_text(text.replace("nebula-logs:19532", f"127.0.0.1:{port}"))
    # Test only: the sandbox shares the host's network, so the collector listens on a free port, not 19532.
    box.install_dropin("systemd-journal-remote.socket", f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    box.daemon_reload()


def remote_records(box: SystemdSandbox, *matches: str) -> list[dict[str, Any]]:
    out = box.exec(["journalctl", f"--directory={REMOTE_DIR}", "--no-pager", "-o", "json", *matches],
                   check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_a_nebula_line_reaches_the_collector_with_its_fields(box: SystemdSandbox) -> None:
    port = free_port()
    install_shipped(box, port)
    token = uuid.uuid4().hex
    # The node ships first, while the collector is not listening yet (as at boot): the stock unit would
    # hit its start limit within a second and stop for good; the shipped drop-in keeps retrying.
    box.systemctl("start", "systemd-journal-upload.service")
    box.exec(["systemd-run", "--wait", "--unit=nebula-engine@shipmodel:1", f"--working-directory={REPO_ROOT}",
              PYTHON, "-c", LOG_LINE, token])
    time.sleep(3)
    upload = box.show("systemd-journal-upload.service", "ActiveState", "SubState")
    assert (upload["ActiveState"], upload["SubState"]) == ("activating", "auto-restart"), upload

    box.systemctl("start", "systemd-journal-remote.socket")
    deadline = time.monotonic() + 60
    while not (records := remote_records(box, "NEBULA_MODEL=shipmodel")):
        assert time.monotonic() < deadline, box.exec(["journalctl", "-u", "systemd-journal-upload",
                                                      "-u", "systemd-journal-remote", "--no-pager"]).stdout
        time.sleep(0.5)
    hostname = box.exec(["hostname"]).stdout.strip()
    mine = [r for r in records if token in r.get("MESSAGE", "")]
    assert len(mine) == 1, records
    assert mine[0]["NEBULA_INSTANCE"] == "shipmodel:1"
    assert mine[0]["_SYSTEMD_UNIT"] == "nebula-engine@shipmodel:1.service"
    assert mine[0]["_HOSTNAME"] == hostname
    assert box.show("systemd-journal-remote.service", "ActiveState")["ActiveState"] == "active"

    # The operator's view on the collector: all replicas of the model, this node only, from the remote journal.
    def nebula_logs(*args: str) -> str:
        res = box.exec([PYTHON, "-m", "nebula", "logs", "shipmodel", "--remote", *args], check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert token in nebula_logs("--node", hostname, "--since", "10m")
    assert token not in nebula_logs("--node", "some-other-node")
