"""etc/nebula/nebula.toml, the reference config the package installs, is what the config's field docs generate."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nebula.cli.config_cmd import reference_config
from nebula.cli.main import main
from nebula.core.config import NebulaConfig, parse_config

REFERENCE = Path(__file__).resolve().parents[2] / "etc" / "nebula" / "nebula.toml"
REGENERATE = "python -m nebula config init --stdout > etc/nebula/nebula.toml"


def test_the_reference_config_is_generated_from_the_field_docs() -> None:
    assert REFERENCE.read_text() == reference_config(), (
        f"{REFERENCE} is not what the config's field docs generate; regenerate it: {REGENERATE}")


def test_the_reference_config_sets_nothing_and_documents_every_setting() -> None:
    text = REFERENCE.read_text()
    assert tomllib.loads(text) == {section: {} for section in tomllib.loads(text)}  # headers and comments only
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line for line in text.splitlines())
    assert parse_config(tomllib.loads(uncommented), {}, "reference") == NebulaConfig()
    assert "[catalog]" in text and '"/etc/nebula/catalog.d/*.toml"' in text


def test_config_init_stdout_prints_it_and_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "nebula.toml"
    assert main(["--config", str(target), "config", "init", "--stdout"], {}) == 0
    assert capsys.readouterr().out == reference_config() and not target.exists()
