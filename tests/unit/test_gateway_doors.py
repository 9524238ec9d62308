"""Doors the gateway and the CLI must keep shut: a gateway that would be open beyond loopback does not start,
an inference key reaches a model whose name starts like an admin path, and the CLI never carries its key
across a redirect."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from nebula.cli.client import EXIT_USAGE, AdminClient, CliError
from nebula.core.config import GatewayConfig
from nebula.errors import ConfigError
from nebula.services.gateway.app import with_bootstrap_key
from nebula.services.gateway.auth import Scope, scope_of

REPO = Path(__file__).resolve().parents[2]


# --- a gateway beyond loopback needs an admin key of its own ----------------------------------------------


def test_gateway_beyond_loopback_without_an_admin_key_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "nebula.toml"
    config.write_text(f'[gateway]\nhost = "0.0.0.0"\nport = 1\nadmin_key_digest_file = "{tmp_path}/none"\n'
                      '[cluster]\netcd_endpoints = ["http://127.0.0.1:1"]\n')
    res = subprocess.run([sys.executable, "-m", "nebula", "--config", str(config), "gateway", "run"],
                         capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin",
                                                                          "PYTHONPATH": str(REPO)})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "gateway.host" in lines[0] and "admin_key_hashes" in lines[0], res.stderr
    assert f"{tmp_path}/none" in lines[0] and "nebula up" in lines[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "gateway.example"])
def test_every_non_loopback_bind_needs_an_admin_key(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^gateway\.host"):
        with_bootstrap_key(GatewayConfig(host=host, admin_key_digest_file=""))
    # Inference keys alone do not do: the admin API would answer whoever holds a stored key, or nobody.
    with pytest.raises(ConfigError):
        with_bootstrap_key(GatewayConfig(host=host, admin_key_digest_file="", api_key_hashes=("a" * 64,)))
    digest = tmp_path / "admin.key.sha256"
    digest.write_text(hashlib.sha256(b"k").hexdigest() + "\n")
    assert with_bootstrap_key(GatewayConfig(host=host, admin_key_digest_file=str(digest))).admin_key_hashes
    assert with_bootstrap_key(GatewayConfig(host=host, admin_key_digest_file="", admin_key_hashes=("b" * 64,)))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_may_stay_open_for_a_development_box(host: str) -> None:
    assert with_bootstrap_key(GatewayConfig(host=host, admin_key_digest_file="")).admin_key_hashes == ()


# --- path scopes ------------------------------------------------------------------------------------------


def test_admin_scope_is_the_admin_paths_not_their_prefixes() -> None:
    assert scope_of("/v1/models/load") is Scope.ADMIN
    assert scope_of("/v1/admin") is Scope.ADMIN and scope_of("/v1/admin/models/x") is Scope.ADMIN
    # A model named "loader" (or "load-test") is an inference resource like any other.
    for path in ("/v1/models/loader", "/v1/models/load-test", "/v1/administrator", "/v1/models/load.x"):
        assert scope_of(path) is Scope.INFERENCE, path


# --- the CLI and redirects --------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    seen: list[str | None]
    location: str

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        if self.location:
            self.send_response(302)
            self.send_header("Location", self.location)
        else:
            self.send_response(200)
        self.send_header("Content-Length", "2" if not self.location else "0")
        self.end_headers()
        if not self.location:
            self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


def _serve(location: str, seen: list[str | None]) -> Iterator[str]:
    handler = type("H", (_Recorder,), {"seen": seen, "location": location})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_cli_never_follows_a_redirect_with_its_key() -> None:
    elsewhere: list[str | None] = []
    gateway: list[str | None] = []
    for other in _serve("", elsewhere):
        # 127.0.0.1 and localhost are different origins, as another host would be.
        for url in _serve(other.replace("127.0.0.1", "localhost") + "/v1/admin/models", gateway):
            with pytest.raises(CliError) as e:
                AdminClient(url, "nbk_secret").call("GET", "/v1/admin/models")
    assert gateway == ["Bearer nbk_secret"] and elsewhere == []
    assert e.value.code == EXIT_USAGE and "NEBULA_URL" in str(e.value) and "\n" not in str(e.value)
