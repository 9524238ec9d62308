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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from compile_data_path import MODULES  # noqa: E402 - a script, found through the path set above

# Not run against the compiled build: it asserts that cProfile names the request path's Python functions,
# which compiled code does not report.
PYTHON_ONLY = ["tests/unit/test_bench_request_path.py"]


def _copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository's files (committed or not, as git sees them) with its data path compiled."""
    tree = tmp_path_factory.mktemp("compiled")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    done = subprocess.run([sys.executable, "scripts/compile_data_path.py", str(tree)], cwd=tree,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(done.stdout.split()) == len(MODULES) + 1, done.stdout  # one per module and mypyc's runtime
    return tree


def _env(path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(path), "PYTHONDONTWRITEBYTECODE": "1"}


def test_the_script_refuses_a_working_tree() -> None:
    # A module built beside its source in the checkout would hide every later edit of that source.
    done = subprocess.run([sys.executable, "scripts/compile_data_path.py", str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "is a working tree" in done.stderr, done.stderr
    assert not list((ROOT / "nebula").rglob("*.so"))


def test_installed_into_a_site_the_modules_load_compiled(compiled: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    _copy(ROOT / "nebula", site / "nebula")  # an installed nebula: the sources where the package puts them
    done = subprocess.run([sys.executable, "scripts/compile_data_path.py", str(compiled), "--install", str(site)],
                          cwd=compiled, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [Path(line) for line in done.stdout.split()] == sorted(site.rglob("*.so"))
    # The script's check, as build-deb.sh runs it with the venv's Python; PYTHONPATH stands for that venv here.
    check = subprocess.run([sys.executable, str(compiled / "scripts/compile_data_path.py"), "--check", str(site)],
                           cwd=tmp_path, env=_env(site), capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr[-3000:]
    # And what it says when they are not: the same site without the extension modules loads the sources.
    for path in site.rglob("*.so"):
        path.unlink()
    check = subprocess.run([sys.executable, str(compiled / "scripts/compile_data_path.py"), "--check", str(site)],
                           cwd=tmp_path, env=_env(site), capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and "nebula.adapters.http1_request from " in check.stderr, check.stderr


def test_the_unit_suite_passes_against_the_compiled_modules(compiled: Path) -> None:
    # `python -m pytest` puts the copy first on sys.path, before the dev venv's editable install of the checkout.
    where = subprocess.run([sys.executable, "scripts/compile_data_path.py", "--check", str(compiled)], cwd=compiled,
                           env=_env(compiled), capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr[-3000:]
    deselect = [arg for path in PYTHON_ONLY for arg in ("--deselect", path)]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit", *deselect],
                          cwd=compiled, env=_env(compiled), capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) > 1500, summary
    assert not re.search(r"skipped|failed|error|xfail", summary), summary
