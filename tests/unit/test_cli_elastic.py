"""`nebula load` with elastic-capacity flags, `nebula scale` on an elastic model, and how list / status show a
model the scheduler scaled to zero: against a real gateway app on an in-memory store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nebula.cli.client import CliError
from nebula.cli.elastic import parse_duration
from nebula.core import keys
from nebula.core.elastic import ScaleState
from tests.unit.served_gateway import ServedGateway, run_cli, served_gateway

run = run_cli


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServedGateway]:
    with served_gateway() as gw:
        yield gw


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400),
                                               ("1.5h", 5400), (" 2m30s ", 150)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "-5m", "0s", "m"])
def test_a_bad_duration_is_a_usage_error(text: str) -> None:
    with pytest.raises(CliError) as e:
        parse_duration(text)
    assert e.value.code == 2 and "--idle-unload" in str(e.value)


def test_elastic_load_then_idle_in_list_and_status_and_scale_refused(capsys: pytest.CaptureFixture[str],
                                                                     gateway: ServedGateway, tmp_path: Path) -> None:
    code, out, err = run(capsys, gateway.url, "load", "el", "--source", str(tmp_path), "--min-replicas", "0",
                         "--max-replicas", "3", "--idle-unload", "10m", "--idle-action", "stop", "--priority", "5")
    assert code == 0, err
    code, out, _ = run(capsys, gateway.url, "list", "--json")
    (m,) = [m for m in json.loads(out) if m["name"] == "el"]
    assert m["spec"]["replicas"] == 1
    assert m["spec"]["scaling"] == {"min_replicas": 0, "max_replicas": 3, "idle_unload_s": 600.0,
                                    "idle_action": "stop", "sleep_level": 1, "priority": 5}
    assert m["scale"]["state"] == "active" and m["scale"]["reason"] == "not yet seen by the scheduler"

    # The scheduler unloaded it: list and status say idle (not pending), with the reason.
    reason = "idle: no inference request for 10m (idle_unload_s 10m); unloaded to 0 replicas"
    gateway.put(keys.scale_key("el"), ScaleState(model="el", replicas=0, reason=reason, since=1.0).to_dict())
    code, out, _ = run(capsys, gateway.url, "list")
    (row,) = [line for line in out.splitlines() if line.startswith("el ")]
    assert "0/0" in row and " idle " in row and "pending" not in row and reason in row
    code, out, _ = run(capsys, gateway.url, "status")
    assert any(line.startswith("el ") and " idle " in line for line in out.splitlines())
    code, out, _ = run(capsys, gateway.url, "status", "--json")
    (m,) = [m for m in json.loads(out)["models"] if m["name"] == "el"]
    assert m["scale"]["state"] == "idle" and m["scale"]["replicas"] == 0

    code, _, err = run(capsys, gateway.url, "scale", "el", "2")
    assert code != 0 and err.count("\n") == 1
    assert "scales itself" in err and "between 0 and 3 replicas" in err
    run(capsys, gateway.url, "unload", "el")


def test_min_replicas_above_one_starts_there(capsys: pytest.CaptureFixture[str], gateway: ServedGateway,
                                             tmp_path: Path) -> None:
    code, _, err = run(capsys, gateway.url, "load", "el2", "--source", str(tmp_path), "--min-replicas", "2",
                       "--max-replicas", "4")
    assert code == 0, err
    code, out, _ = run(capsys, gateway.url, "list", "--json")
    (m,) = [m for m in json.loads(out) if m["name"] == "el2"]
    assert m["spec"]["replicas"] == 2
    run(capsys, gateway.url, "unload", "el2")


@pytest.mark.parametrize(("flags", "message"), [
    (("--min-replicas", "3", "--max-replicas", "2", "--replicas", "2"),
     "scaling.min_replicas: (3) must not be above max_replicas (2)"),
    (("--min-replicas", "0"), "scaling.idle_unload_s: is required when min_replicas is 0"),
    (("--min-replicas", "1", "--max-replicas", "2", "--replicas", "3"),
     "replicas: (3) must lie between min_replicas (1) and max_replicas"),
    (("--idle-unload", "soon"), "--idle-unload 'soon': give a duration such as 90s, 10m or 1h30m"),
])
def test_bad_bounds_give_the_policys_one_line_error(capsys: pytest.CaptureFixture[str], gateway: ServedGateway,
                                                    flags: tuple[str, ...], message: str) -> None:
    code, _, err = run(capsys, gateway.url, "load", "bad", "--source", "/x", *flags)
    assert code == 2 and err.startswith("nebula: ") and message in err and err.count("\n") == 1, err
