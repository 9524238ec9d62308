"""Where an instance's weights come from. This version serves local directories; hub ids fail clearly."""

from __future__ import annotations

from pathlib import Path

from nebula.errors import PermanentError


def resolve_source(source: str) -> str:
    """The local directory holding the model's weights, or PermanentError saying why there is none."""
    path = source.removeprefix("file://")
    if path.startswith("/") or path.startswith("."):
        p = Path(path)
        if not p.exists():
            raise PermanentError(f"source path {path} does not exist on this node")
        if not (p / "config.json").exists():
            raise PermanentError(f"source path {path} has no config.json: not a model directory")
        return str(p.resolve())
    raise PermanentError(
        f"source {source!r} is not a local path; hub downloads are not available in this version "
        "(give an absolute path to a model directory)")
