"""`nebula up` (and through it the quickstart) makes the bootstrap admin key where the config puts it, so the
admin API is closed from the first start and the CLI finds the key by default; an existing key is never
replaced and the operator is never locked out."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.cli import up as up_cmd
from nebula.cli.bootstrap_key import ensure_admin_key
from nebula.cli.client import CliError, admin_key
from nebula.core.config import GatewayConfig, NebulaConfig, NodeConfig
from nebula.services.gateway.app import build_gateway_app, with_bootstrap_key
from tests.harness.gateway_server import GatewayServer

REPO = Path(__file__).resolve().parents[2]


def config_in(tmp_path: Path) -> NebulaConfig:
    return NebulaConfig(gateway=GatewayConfig(admin_key_file=str(tmp_path / "etc" / "admin.key"),
                                              admin_key_digest_file=str(tmp_path / "etc" / "admin.key.sha256")),
                        node=NodeConfig(run_dir=str(tmp_path / "run")))


def up_here(cfg: NebulaConfig, monkeypatch: pytest.MonkeyPatch) -> str:
    """`nebula up` as on a machine where the rest is up already; the admin key the CLI then finds."""
    monkeypatch.setattr(up_cmd, "_systemd", lambda: False)
    monkeypatch.setattr(up_cmd, "_running_pid", lambda _cfg: 4242)
    monkeypatch.setattr(up_cmd, "_gateway_healthy", lambda _url: True)
    assert up_cmd.up(cfg, {}) == 0
    key, digest = Path(cfg.gateway.admin_key_file), Path(cfg.gateway.admin_key_digest_file)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(digest.stat().st_mode) == 0o640
    token = admin_key({}, cfg.gateway.admin_key_file)  # the CLI's default, from the config
    assert token is not None and token.startswith("nbk_")
    assert digest.read_text().split()[0] == hashlib.sha256(token.encode()).hexdigest()
    return token


async def test_nebula_up_makes_the_key_the_cli_sends_and_the_gateway_closes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_in(tmp_path)
    token = up_here(cfg, monkeypatch)
    assert "created the bootstrap admin key" in capsys.readouterr().out

    # The gateway reads the digest: closed to anyone without the key, open to the CLI's.
    server = GatewayServer(build_gateway_app(with_bootstrap_key(cfg.gateway), MemoryStore(), CollectorRegistry()))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            for headers, status in (({}, 401), ({"Authorization": f"Bearer {token}"}, 200)):
                async with http.get(server.make_url("/v1/admin/nodes"), headers=headers) as resp:
                    assert resp.status == status
    finally:
        await server.close()

    assert up_here(cfg, monkeypatch) == token  # a second `nebula up` keeps the key


def test_an_existing_key_is_kept_and_its_digest_restored(tmp_path: Path) -> None:
    cfg = config_in(tmp_path).gateway
    key, digest = Path(cfg.admin_key_file), Path(cfg.admin_key_digest_file)
    key.parent.mkdir()
    key.write_text("nbk_mine\n")
    assert ensure_admin_key(cfg) is not None
    assert key.read_text() == "nbk_mine\n"
    assert digest.read_text().strip() == hashlib.sha256(b"nbk_mine").hexdigest()
    # A digest whose key lives elsewhere is the operator's: nothing is made or changed.
    key.unlink()
    assert ensure_admin_key(cfg) is None and not key.exists()


def test_no_bootstrap_key_when_the_config_turns_it_off(tmp_path: Path) -> None:
    assert ensure_admin_key(GatewayConfig(admin_key_file="", admin_key_digest_file=str(tmp_path / "d"))) is None
    assert not (tmp_path / "d").exists()


def test_a_key_that_cannot_be_written_stops_nebula_up(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CliError, match=r"gateway\.admin_key_file"):
        ensure_admin_key(GatewayConfig(admin_key_file=str(blocker / "admin.key"),
                                       admin_key_digest_file=str(blocker / "admin.key.sha256")))


def test_the_quickstart_brings_nebula_up_with_its_key_and_its_example_sends_one() -> None:
    text = (REPO / "scripts" / "quickstart.sh").read_text()
    assert text.index("\nnebula up\n") < text.index("\nnebula load ")
    assert "admin_key_file" not in text  # nothing turns the bootstrap key off
    example = text[text.index("curl -s"):]
    assert 'Authorization: Bearer' in example.split("nebula list")[0]
