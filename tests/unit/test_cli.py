"""The `nebula` CLI against a real gateway app (in-memory store): exit codes and one-line messages."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nebula.cli.client import AdminClient, CliError
from nebula.cli.main import build_parser, main
from nebula.cli.models import load
from tests.harness.ports import free_port
from tests.unit.served_gateway import ADMIN_KEY, ServedGateway, run_cli, served_gateway


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServedGateway]:
    with served_gateway() as gw:
        yield gw


@pytest.fixture(scope="module")
def gateway_url(gateway: ServedGateway) -> str:
    return gateway.url


run = run_cli


def test_load_list_scale_unload(capsys: pytest.CaptureFixture[str], gateway_url: str, tmp_path: Path) -> None:
    code, out, _ = run(capsys, gateway_url, "load", "m1", "--source", str(tmp_path))
    assert code == 0 and "m1 loading" in out
    code, out, _ = run(capsys, gateway_url, "load", "m1", "--source", str(tmp_path))
    assert code == 0 and "already loaded" in out
    code, out, _ = run(capsys, gateway_url, "list", "--json")
    models = json.loads(out)
    assert code == 0 and [m["name"] for m in models] == ["m1"] and models[0]["spec"]["replicas"] == 1
    code, out, _ = run(capsys, gateway_url, "list")
    assert "m1" in out and "pending" in out
    code, out, _ = run(capsys, gateway_url, "scale", "m1", "3")
    assert code == 0 and "3 replica" in out
    code, out, _ = run(capsys, gateway_url, "unload", "m1")
    assert code == 0
    code, out, _ = run(capsys, gateway_url, "list")
    assert "no models loaded" in out


@pytest.mark.parametrize(("argv", "code", "message"), [
    (("load", "m2", "--source", "/x", "--replicas", "0"), 2, "replicas: must be between 1 and 64"),
    (("load", "M!", "--source", "/x"), 2, "name: must be"),
    (("unload", "ghost"), 3, "not loaded"),
    (("scale", "ghost", "2"), 3, "not loaded"),
    (("scale", "ghost", "2", "--json"), 3, "not loaded"),
    (("status", "--watch", "--interval", "0"), 2, "--interval must be positive"),
    (("status", "--watch", "--json"), 2, "scripts poll `nebula status --json`"),
])
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], gateway_url: str, argv: tuple[str, ...],
                             code: int, message: str) -> None:
    got, _, err = run(capsys, gateway_url, *argv)
    assert got == code
    assert err.startswith("nebula: ") and message in err and err.count("\n") == 1, err


def test_admin_key_required_and_hint(capsys: pytest.CaptureFixture[str], gateway_url: str) -> None:
    code, _, err = run(capsys, gateway_url, "list", key=None)
    assert code == 1 and "NEBULA_ADMIN_KEY" in err and err.count("\n") == 1


def test_gateway_down_says_how_to_fix(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, f"http://127.0.0.1:{free_port()}", "list")
    assert code == 5 and "nebula up" in err and err.count("\n") == 1


def test_bad_config_names_file_and_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "nebula.toml"
    cfg.write_text("[gateway]\nport = 'eighty'\n")
    code = main(["--config", str(cfg), "list"], {})
    err = capsys.readouterr().err
    assert code == 2 and err == f"nebula: {cfg}: gateway.port: must be an integer, got 'eighty'\n"


def test_every_write_has_json(capsys: pytest.CaptureFixture[str], gateway_url: str, tmp_path: Path) -> None:
    code, out, _ = run(capsys, gateway_url, "load", "j1", "--source", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["model"]["name"] == "j1"
    code, out, _ = run(capsys, gateway_url, "scale", "j1", "2", "--json")
    assert code == 0 and json.loads(out)["model"]["replicas"] == 2
    code, out, _ = run(capsys, gateway_url, "unload", "j1", "--json")
    assert code == 0 and json.loads(out) == {"name": "j1", "deleted": True}


def test_help_documents_exit_codes() -> None:
    text = build_parser().format_help()
    for line in ("0  ok", "2  usage", "3  not found", "4  timeout", "5  unreachable"):
        assert line in text


def _instance(phase: str, message: str = "", progress: float | None = None) -> dict[str, Any]:
    return {"instance": "w1", "model": "w1", "node": "node-a", "phase": phase, "endpoint": "http://127.0.0.1:1",
            "task": "generate", "since": 0.0, "message": message, "restarts": 0, "progress": progress}


class Steps:
    """A clock and sleep for load --wait: each sleep moves time on and applies the next cluster change."""

    def __init__(self, gateway: ServedGateway, changes: list[dict[str, Any] | None]) -> None:
        self.gateway = gateway
        self.changes = changes
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.changes and (change := self.changes.pop(0)) is not None:
            self.gateway.put("/nebula/instances/w1", change)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def w1(gateway: ServedGateway) -> Iterator[AdminClient]:
    yield AdminClient(gateway.url, ADMIN_KEY)
    gateway.delete("/nebula/models/w1")
    gateway.delete("/nebula/instances/w1")


def test_load_wait_prints_a_line_per_change_when_piped(capsys: pytest.CaptureFixture[str], gateway: ServedGateway,
                                                       w1: AdminClient) -> None:
    steps = Steps(gateway, [_instance("downloading", "fetching weights", 0.43), None,
                            _instance("starting"), None, _instance("ready")])
    out = io.StringIO()
    code = load(w1, {"name": "w1", "source": "/models/w1"}, wait_s=60, as_json=False, out=out,
                clock=steps.clock, sleep=steps.sleep)
    lines = out.getvalue().splitlines()
    assert code == 0
    assert lines[0] == "w1: 0/1 ready [waiting for placement], 0s"
    assert lines[1].startswith("w1: 0/1 ready [1 downloading], ") and "fetching weights" in lines[1]
    assert lines[2] == "w1: 0/1 ready [1 starting], 3s"  # one line per change: the unchanged poll printed none
    assert lines[3] == "w1: 1/1 ready [1 ready], 5s" and len(lines) == 4
    assert "model w1 is ready (1/1 replica(s) ready) after 5 s" in capsys.readouterr().out


def test_load_wait_redraws_one_line_on_a_tty(gateway: ServedGateway, w1: AdminClient) -> None:
    steps = Steps(gateway, [_instance("starting"), _instance("ready")])
    out = Tty()
    load(w1, {"name": "w1", "source": "/models/w1"}, wait_s=60, as_json=False, out=out, clock=steps.clock,
         sleep=steps.sleep)
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 3 and text.count("\n") == 1 and text.endswith("[1 ready], 2s\n")


def test_load_wait_timeout_and_failure_exit_codes(gateway: ServedGateway, w1: AdminClient) -> None:
    steps = Steps(gateway, [_instance("starting")] + [None] * 20)
    with pytest.raises(CliError) as timeout:
        load(w1, {"name": "w1", "source": "/models/w1"}, wait_s=5, as_json=True, out=io.StringIO(),
             clock=steps.clock, sleep=steps.sleep)
    assert timeout.value.code == 4 and "not ready after 5 s (w1: 0/1 ready [1 starting])" in str(timeout.value)
    steps = Steps(gateway, [_instance("failed", "source path /models/w1 does not exist on this node")])
    with pytest.raises(CliError) as failed:
        load(w1, {"name": "w1", "source": "/models/w1"}, wait_s=60, as_json=True, out=io.StringIO(),
             clock=steps.clock, sleep=steps.sleep)
    assert failed.value.code == 1 and "does not exist on this node" in str(failed.value)


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path: Path) -> None:
    """`nebula config show --json | head -1`: no BrokenPipeError traceback, the shell's SIGPIPE status."""
    config = tmp_path / "nebula.toml"
    config.write_text("")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run([sys.executable, "-m", "nebula", "config", "show", "--json"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=60, check=False,
                             env={**os.environ, "NEBULA_CONFIG": str(config)})
    finally:
        os.close(write_end)
    assert res.returncode == 141 and res.stderr == "", res.stderr


@pytest.mark.parametrize("command", [("config", "check"), ("status",), ("list",)])
def test_a_config_that_is_not_utf8_is_one_line_with_the_fix(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                           command: tuple[str, ...]) -> None:
    cfg = tmp_path / "nebula.toml"
    cfg.write_bytes("# caf\xe9 latin-1\n[gateway]\nport = 8000\n".encode("latin-1"))
    code = main(["--config", str(cfg), *command], {"NEBULA_URL": "http://127.0.0.1:1"})
    err = capsys.readouterr().err
    assert code == 2 and err == (f"nebula: {cfg}: not UTF-8 text (byte 0xe9 at offset 5): save it as UTF-8, "
                                 f"e.g. `iconv -f latin1 -t utf-8 {cfg}`\n")


@pytest.mark.parametrize("wait", ["-5", "nan", "inf"])
def test_load_refuses_a_wait_that_is_no_number_of_seconds(capsys: pytest.CaptureFixture[str], gateway_url: str,
                                                          tmp_path: Path, wait: str) -> None:
    code, _, err = run(capsys, gateway_url, "load", "w5", "--source", str(tmp_path), "--wait", wait)
    assert code == 2 and err.count("\n") == 1 and "0: do not wait" in err, err
    code, out, _ = run(capsys, gateway_url, "list")
    assert "w5" not in out, "nothing is loaded after a refused command"


def test_relative_sources_are_made_absolute_or_refused_with_the_fix(
        capsys: pytest.CaptureFixture[str], gateway_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for source in ("models/x", "./models/x", "models/x/"):
        code, out, _ = run(capsys, gateway_url, "load", "rel", "--source", source, "--json")
        assert code == 0 and json.loads(out)["model"]["source"] == str(tmp_path / "models" / "x"), (source, out)
    run(capsys, gateway_url, "unload", "rel")
    for source, message in [("models/y", "ambiguous: no such directory here, but models/ is one; write ./models/y"),
                            ("./nothing", "no such directory here; give the model directory's absolute path"),
                            ("a/b/c", "no such directory here")]:
        code, _, err = run(capsys, gateway_url, "load", "bad", "--source", source)
        assert code == 2 and message in err and err.count("\n") == 1, (source, err)
    # A hub id stays a hub id: no such directory, and no directory of its organisation's name either.
    code, out, _ = run(capsys, gateway_url, "load", "hub", "--source", "Qwen/Qwen2.5-7B-Instruct", "--json")
    assert code == 0 and json.loads(out)["model"]["source"] == "Qwen/Qwen2.5-7B-Instruct"
    run(capsys, gateway_url, "unload", "hub")
