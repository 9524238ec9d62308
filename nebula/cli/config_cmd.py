"""`nebula config check|init|show`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from nebula.core.config import NebulaConfig, config_template
from nebula.services.runtime import config_path, load_config


def render_config(cfg: NebulaConfig) -> str:
    """A TOML file of every setting: `## ` lines document, `# ` lines are the setting at its default."""
    out: list[str] = ["## Nebula configuration. Every key can also be set as NEBULA_<SECTION>_<KEY>.",
                      "## Files in nebula.d/*.toml beside this one override it, key by key.", ""]
    section = ""
    for sname, key, doc, value in config_template(cfg):
        if sname != section:
            out += ["", f"[{sname}]"] if section else [f"[{sname}]"]
            section = sname
        out.append(f"## {doc}")
        rendered = tomli_w.dumps({key: list(value) if isinstance(value, tuple) else value}).strip()
        out += [f"# {line}" for line in rendered.splitlines()]
    return "\n".join(out) + "\n"


def reference_config() -> str:
    """etc/nebula/nebula.toml, the reference config the package installs: every setting at its default, as
    generated from the config's field docs (tests/unit/test_reference_config.py keeps the file in step)."""
    return render_config(NebulaConfig())


def config_command(action: str, explicit: str | None, env: Mapping[str, str], *, as_json: bool = False,
                   stdout: bool = False) -> int:
    if action == "init" and stdout:
        sys.stdout.write(reference_config())
        return 0
    path = config_path(env, explicit)
    if action == "init":
        if path.exists():
            print(f"nebula: {path} exists; not overwriting it (remove it first)", file=sys.stderr)
            return 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(reference_config())
        os.chmod(path, 0o644)
        print(f"wrote {path}")
        return 0
    cfg = load_config(env, explicit)
    if action == "check":
        if as_json:
            print(json.dumps({"path": str(path), "exists": Path(path).exists(), "ok": True}, sort_keys=True))
        else:
            print(f"{path}: ok" if Path(path).exists() else f"{path}: absent, defaults are valid")
        return 0
    shown = [(sname, key, _shown_value(key, value)) for sname, key, _doc, value in config_template(cfg)]
    if as_json:
        tables: dict[str, dict[str, Any]] = {}
        for sname, key, value in shown:
            tables.setdefault(sname, {})[key] = list(value) if isinstance(value, tuple) else value
        print(json.dumps(tables, indent=2, sort_keys=True))
    else:
        for sname, key, value in shown:
            print(f"{sname}.{key} = {value!r}")
    return 0


def _shown_value(key: str, value: Any) -> Any:
    # `config show` output ends up in tickets and chat: never print a secret, only whether one is set.
    return "(set)" if key.endswith("password") and value else value
