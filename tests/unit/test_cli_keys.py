"""`nebula keys` against a real gateway app (in-memory store, served from its own thread)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.unit.served_gateway import run_cli, served_gateway


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    with served_gateway() as gw:
        yield gw.url


run = run_cli


def models_status(url: str, token: str) -> int:
    req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_create_list_revoke(capsys: pytest.CaptureFixture[str], gateway_url: str) -> None:
    code, out, err = run(capsys, gateway_url, "keys", "create", "team a", "--model", "m1", "--rpm", "60")
    token = out.strip()
    assert code == 0 and token.startswith("nbk_") and "\n" not in token
    assert "shown only now" in err and "scopes inference; models m1; 60/min" in err
    assert models_status(gateway_url, token) == 200

    code, out, _ = run(capsys, gateway_url, "keys", "list", "--json")
    keys = json.loads(out)
    mine = [k for k in keys if k["name"] == "team a"]
    assert code == 0 and len(mine) == 1 and token not in out
    assert mine[0]["models"] == ["m1"] and mine[0]["limits"]["requests_per_minute"] == 60
    code, out, _ = run(capsys, gateway_url, "keys", "list")
    assert code == 0 and "team a" in out and "config" in out and token not in out

    code, out, _ = run(capsys, gateway_url, "keys", "revoke", "team a")  # by name: only one has it
    assert code == 0 and f"key {mine[0]['id']} revoked" in out
    assert models_status(gateway_url, token) == 401
    code, _, err = run(capsys, gateway_url, "keys", "revoke", mine[0]["id"])
    assert code == 3 and "no API key with id" in err


def test_create_json_and_admin_scope(capsys: pytest.CaptureFixture[str], gateway_url: str) -> None:
    code, out, _ = run(capsys, gateway_url, "keys", "create", "ops", "--scope", "admin", "--json")
    created = json.loads(out)
    assert code == 0 and created["scopes"] == ["admin"] and created["key"].startswith("nbk_")
    code, out, _ = run(capsys, gateway_url, "keys", "list", "--json", key=created["key"])  # it can manage keys
    assert code == 0
    code, _, _ = run(capsys, gateway_url, "keys", "revoke", created["id"])
    assert code == 0


@pytest.mark.parametrize(("argv", "code", "message"), [
    (("keys", "create", "x", "--scope", "root"), 2, None),  # argparse
    (("keys", "create", "x", "--rpm", "0"), 2, "limits.requests_per_minute: must be between"),
    (("keys", "create", "x", "--model", "Bad Name"), 2, "models: must be"),
    (("keys", "revoke", "nobody-has-this-name"), 3, "no API key with id or name"),
    (("keys", "revoke", "config:0123456789ab"), 1, "comes from the config file"),
])
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], gateway_url: str, argv: tuple[str, ...],
                             code: int, message: str | None) -> None:
    try:
        got, _, err = run(capsys, gateway_url, *argv)
    except SystemExit as e:  # argparse's own usage error
        got, err = int(str(e.code)), capsys.readouterr().err
    assert got == code, err
    if message:
        assert message in err and err.count("\n") == 1, err


def test_without_the_admin_key_says_how_to_fix(capsys: pytest.CaptureFixture[str], gateway_url: str) -> None:
    code, _, err = run(capsys, gateway_url, "keys", "list", key=None)
    assert code == 1 and "missing API key" in err and "NEBULA_ADMIN_KEY" in err
