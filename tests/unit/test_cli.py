"""The `nebula` CLI against a real gateway app (in-memory store): exit codes and one-line messages."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.cli.main import main
from nebula.core.config import GatewayConfig
from nebula.services.gateway.app import build_gateway_app
from tests.harness.etcd import free_port

ADMIN_KEY = "admin-secret"


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    """A gateway served from its own thread and loop, since the CLI under test blocks."""
    port = free_port()
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    runner_box: list[web.AppRunner] = []

    async def start() -> None:
        cfg = GatewayConfig(admin_key_hashes=(hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),))
        runner = web.AppRunner(build_gateway_app(cfg, MemoryStore(), CollectorRegistry()))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runner_box.append(runner)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def run(capsys: pytest.CaptureFixture[str], url: str, *argv: str, key: str | None = ADMIN_KEY
        ) -> tuple[int, str, str]:
    env = {"NEBULA_URL": url, "NEBULA_CONFIG": "/nonexistent/nebula.toml", "NEBULA_ADMIN_KEY_FILE": "/nonexistent"}
    if key:
        env["NEBULA_ADMIN_KEY"] = key
    code = main(list(argv), env)
    out = capsys.readouterr()
    return code, out.out, out.err


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
    (("load", "m2", "--source", "/x", "--replicas", "0"), 1, "replicas: must be between 1 and 64"),
    (("load", "M!", "--source", "/x"), 1, "name: must be"),
    (("unload", "ghost"), 1, "not loaded"),
    (("scale", "ghost", "2"), 1, "not loaded"),
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
    assert code == 2 and "nebula up" in err and err.count("\n") == 1


def test_bad_config_names_file_and_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "nebula.toml"
    cfg.write_text("[gateway]\nport = 'eighty'\n")
    code = main(["--config", str(cfg), "list"], {})
    err = capsys.readouterr().err
    assert code == 2 and err == f"nebula: {cfg}: gateway.port: must be an integer, got 'eighty'\n"
