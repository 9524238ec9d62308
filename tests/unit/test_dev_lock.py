"""The dev venv's pins: scripts/test.sh installs '.[test]' constrained by packaging/debian/requirements.lock (the
runtime dependencies, as the .deb ships them) and tests/requirements.lock (the test tools). Together they pin
every dependency pyproject.toml names, at a version it allows, and no name twice (two pins of one name could
disagree), so a fresh CI machine installs what the suite last passed with and what the package ships."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)")


def pins(path: str) -> dict[str, str]:
    """name -> version of each `name==version` line (hash continuation lines and comments skipped)."""
    out: dict[str, str] = {}
    for line in (REPO / path).read_text().splitlines():
        m = PIN.match(line)
        if m:
            out[canonicalize_name(m[1])] = m[2]
    return out


def test_the_two_locks_pin_every_dependency_once_at_a_version_pyproject_allows() -> None:
    runtime, tools = pins("packaging/debian/requirements.lock"), pins("tests/requirements.lock")
    assert runtime and tools
    assert not runtime.keys() & tools.keys(), f"pinned in both locks: {sorted(runtime.keys() & tools.keys())}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in map(Requirement, [*project["dependencies"], *project["optional-dependencies"]["test"]]):
        name = canonicalize_name(req.name)
        version = runtime.get(name) or tools.get(name)
        assert version is not None, f"{req.name} is in pyproject.toml but in neither lock: refresh them"
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}=={version} is pinned, outside pyproject.toml's {req.specifier}")
