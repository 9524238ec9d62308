"""`nebula node join`: the drop-in it writes, and that a failed check leaves the files as they were.

etcd is replaced by a check function here; tests/integration/test_node_join.py runs it against a real etcd.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from nebula.cli.client import CliError
from nebula.cli.node_join import JoinRequest, join, parse_labels
from nebula.core.config import NebulaConfig
from nebula.errors import ValidationError
from nebula.services.runtime import load_config

REQ = JoinRequest(etcd=("http://10.0.0.5:2379", "http://10.0.0.6:2379"), name="gpu7", labels=("zone=a", "gpu=h100"),
                  address="10.0.0.7")


def free(_: NebulaConfig, __: str) -> str | None:
    return None


def test_join_writes_a_dropin_beside_the_main_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = tmp_path / "nebula.toml"
    main.write_text("[gateway]\nport = 9000\n")
    seen: list[tuple[tuple[str, ...], str]] = []

    def check(cfg: NebulaConfig, name: str) -> str | None:
        seen.append((cfg.cluster.etcd_endpoints, name))
        return None

    assert join(REQ, {}, str(main), start=True, systemd=False, as_json=False, check=check) == 0
    dropin = tmp_path / "nebula.d" / "50-node.toml"
    assert tomllib.loads(dropin.read_text()) == {
        "cluster": {"etcd_endpoints": ["http://10.0.0.5:2379", "http://10.0.0.6:2379"]},
        "node": {"name": "gpu7", "address": "10.0.0.7", "engine_host": "10.0.0.7", "labels": ["zone=a", "gpu=h100"]}}
    assert main.read_text() == "[gateway]\nport = 9000\n"  # the conffile is never edited
    assert seen == [(REQ.etcd, "gpu7")]
    cfg = load_config({}, str(main))
    assert (cfg.gateway.port, cfg.node.name, cfg.node.labels) == (9000, "gpu7", ("zone=a", "gpu=h100"))
    assert "nebula node run" in capsys.readouterr().out  # no systemd here: says what to run


def test_join_without_a_main_file_writes_the_documented_one(tmp_path: Path) -> None:
    main = tmp_path / "etc" / "nebula.toml"
    join(JoinRequest(etcd=("http://10.0.0.5:2379",), address="10.0.0.7"), {"NEBULA_CONFIG": str(main)}, None,
         start=False, systemd=True, as_json=False, check=free)
    assert main.read_text().startswith("## Nebula configuration")
    cfg = load_config({}, str(main))
    assert cfg.cluster.etcd_endpoints == ("http://10.0.0.5:2379",) and cfg.node.address == "10.0.0.7"


def test_failed_check_puts_the_files_back(tmp_path: Path) -> None:
    main = tmp_path / "nebula.toml"
    dropin = tmp_path / "nebula.d" / "50-node.toml"

    def unreachable(_: NebulaConfig, __: str) -> str | None:
        raise CliError("etcd does not answer", 5)

    with pytest.raises(CliError):
        join(REQ, {}, str(main), start=False, systemd=False, as_json=False, check=unreachable)
    assert not main.exists() and not dropin.exists()
    join(REQ, {}, str(main), start=False, systemd=False, as_json=False, check=free)
    before = dropin.read_text()
    with pytest.raises(CliError) as taken:
        join(JoinRequest(etcd=REQ.etcd, name="gpu7", address="10.0.0.99"), {}, str(main), start=False,
             systemd=False, as_json=False, check=lambda _, __: "10.0.0.7")
    assert taken.value.code == 1 and "registered from 10.0.0.7" in str(taken.value)
    assert dropin.read_text() == before


def test_bad_input_is_named_before_anything_is_written(tmp_path: Path) -> None:
    main = tmp_path / "nebula.toml"
    with pytest.raises(ValidationError, match=r"cluster\.etcd_endpoints"):
        join(JoinRequest(etcd=("10.0.0.5:2379",), address="10.0.0.7"), {}, str(main), start=False,
             systemd=False, as_json=False, check=free)
    with pytest.raises(ValidationError, match="--name"):
        join(JoinRequest(etcd=REQ.etcd, name="GPU 7", address="10.0.0.7"), {}, str(main), start=False,
             systemd=False, as_json=False, check=free)
    assert not main.exists()
    with pytest.raises(CliError) as e:
        parse_labels("zone=a,oops")
    assert e.value.code == 2 and "'oops' must look like key=value" in str(e.value)
    assert parse_labels(" zone=a , gpu=h100 ,") == ("zone=a", "gpu=h100")


def test_systemd_enables_and_restarts_the_agent(tmp_path: Path) -> None:
    ran: list[list[str]] = []

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    join(REQ, {}, str(tmp_path / "nebula.toml"), start=True, systemd=True, as_json=False, check=free, run=run)
    assert ran == [["systemctl", "enable", "nebula-node.service"], ["systemctl", "restart", "nebula-node.service"]]

    def failing(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 5, "", "Failed to enable unit: Unit file nebula-node.service "
                                                        "does not exist.\n")

    with pytest.raises(CliError) as e:
        join(REQ, {}, str(tmp_path / "nebula.toml"), start=True, systemd=True, as_json=False, check=free,
             run=failing)
    assert "Unit file nebula-node.service does not exist" in str(e.value)
