"""tests/requirements.lock, the dev venv's pinned versions (scripts/test.sh installs '.[test]' under it): it pins
every dependency pyproject.toml names, at a version pyproject.toml allows, so a fresh CI machine installs what
the suite last passed with and a dependency added to pyproject.toml without a refreshed lock fails here."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (REPO / "tests/requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not a pin: {line!r}"
            out[canonicalize_name(name)] = version
    return out


def test_the_lock_pins_every_dependency_at_a_version_pyproject_allows() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]
    pinned = pins()
    assert len(pinned) > len(wanted)  # the transitive ones too
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is in pyproject.toml but not in tests/requirements.lock: refresh it"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"tests/requirements.lock pins {req.name}=={pinned[name]}, outside pyproject.toml's {req.specifier}")
