"""`nebula config init` writes a file that parses, and whose every setting, uncommented, is the default."""

from __future__ import annotations

import tomllib

from nebula.cli.config_cmd import render_config
from nebula.core.config import NebulaConfig, parse_config


def test_rendered_config_parses_commented_and_uncommented() -> None:
    text = render_config(NebulaConfig())
    assert parse_config(tomllib.loads(text), {}, "init") == NebulaConfig()
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line for line in text.splitlines())
    assert parse_config(tomllib.loads(uncommented), {}, "init") == NebulaConfig()
