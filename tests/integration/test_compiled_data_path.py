"""The gateway's data path compiled with mypyc (scripts/compile_data_path.py), as the .deb ships it: the modules
build with the real compiler, load as extension modules from where an installed nebula keeps them, and the unit
suite passes against them unchanged (the parser corpus and smuggling cases, the fast server's framing,
pipelining, limits, refusals and hand-over, hostile input, the relay, validation, keys and every endpoint
through the real app).

A compiled module may behave unlike its source where Python is lenient about its annotations (a `float`
parameter takes an int as a float, an attribute holds an object of another type than it says), which is what
running the same tests against it catches."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Compiled:
    tree: Path  # a copy of the repository, its data path compiled in place
    site: Path  # an installed nebula (its sources), into which the compiled modules were installed


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """A copy of the repository's files (committed or not, as git sees them), compiled and installed the way
    build-deb.sh does it: one call of the script with --install."""
    tree, site = tmp_path_factory.mktemp("compiled"), tmp_path_factory.mktemp("site-packages")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(tree / "nebula", site / "nebula")  # the sources where an installed package has them
    done = subprocess.run([sys.executable, "scripts/compile_data_path.py", str(tree), "--install", str(site)],
                          cwd=tree, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # What it installed is what it built: each module's extension and mypyc's runtime, nothing else.
    installed = [Path(line) for line in done.stdout.split()]
    assert installed == sorted(site.rglob("*.so")), done.stdout
    assert [p.relative_to(site) for p in installed] == [p.relative_to(tree) for p in sorted(tree.rglob("*.so"))]
    return Compiled(tree, site)


def _env(path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(path), "PYTHONDONTWRITEBYTECODE": "1"}


def _check(script: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The script's check, as build-deb.sh runs it with the venv's Python; PYTHONPATH stands for that venv."""
    return subprocess.run([sys.executable, str(script), "--check", str(site)], cwd=cwd, env=_env(site),
                          capture_output=True, text=True, timeout=60)


def test_the_script_refuses_a_working_tree() -> None:
    # A module built beside its source in the checkout would hide every later edit of that source.
    done = subprocess.run([sys.executable, "scripts/compile_data_path.py", str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "is a working tree" in done.stderr, done.stderr
    assert not list((ROOT / "nebula").rglob("*.so"))


def test_installed_into_a_site_the_modules_load_compiled(compiled: Compiled, tmp_path: Path) -> None:
    script = compiled.tree / "scripts/compile_data_path.py"
    check = _check(script, compiled.site, tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    # And what it says when they are not: a site without the extension modules loads the sources.
    bare = tmp_path / "bare"
    shutil.copytree(compiled.site, bare, ignore=shutil.ignore_patterns("*.so"))
    check = _check(script, bare, tmp_path)
    assert check.returncode != 0 and "nebula.adapters.http1_request from " in check.stderr, check.stderr


def test_the_unit_suite_passes_against_the_compiled_modules(compiled: Compiled) -> None:
    # `python -m pytest` puts the copy first on sys.path, before the dev venv's editable install of the checkout.
    tree = compiled.tree
    where = _check(tree / "scripts/compile_data_path.py", tree, tree)
    assert where.returncode == 0, where.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"], cwd=tree,
                          env=_env(tree), capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) > 1500, summary
    assert not re.search(r"skipped|failed|error|xfail", summary), summary
