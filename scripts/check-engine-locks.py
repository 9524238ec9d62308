#!/usr/bin/env python3
"""Check the GPU engine locks against the package registry without installing them (each is several GB).

    scripts/check-engine-locks.py [--in FILE] [--lock FILE ...] [--jobs N] [--full [DIR]]

The locks default to the .in's per-Python ones (vllm-gpu.in: vllm-gpu-py311.lock, vllm-gpu-py313.lock); each is
checked for the Python its header was compiled for (`--python-version 3.X`).
1. Current: re-resolves the .in the way the lock's header does, with the lock as the resolver's preferences,
   and fails unless that gives the same pins: an edited .in or a pin the registry no longer serves shows
   here; a transitive release alone does not.
2. Installable: for each pin, the registry's file list (the simple index's JSON form, one small request per
   package and run, no wheel downloaded) must hold a wheel for that CPython on manylinux x86_64 whose sha256
   is one of the lock's hashes for that pin; prints the total download size of the wheels an install would
   fetch. (`uv pip install --dry-run --require-hashes` does not verify hashes, so it cannot stand in for this.)
3. --full [DIR]: also really installs the lock of the Python running this script with scripts/install-engine.sh
   (--no-default) into DIR (default a temporary directory, removed afterwards), which ends with
   `vllm --version`. Run weekly, not per commit.

Needs uv ($UV, on PATH, or where scripts/test.sh puts it) and the registry uv is configured for.
Exit 0: all good; 1: a check failed (each problem on its own line); 2: usage or no uv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_version, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from nebula.core.engine_locks import lock_python  # noqa: E402
from nebula.core.engine_runtime import Pin, parse_lock  # noqa: E402

# What Debian 12 (glibc 2.36) takes, best first: the order uv and pip prefer tags in (Debian 13's glibc 2.41
# takes these too; no wheel in the locks needs more than 2.36).
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(36, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def compile_args(python: tuple[int, int]) -> list[str]:
    return ["--python-version", f"{python[0]}.{python[1]}", "--python-platform", "x86_64-unknown-linux-gnu",
            "--generate-hashes"]


def cp(python: tuple[int, int]) -> str:
    return f"cp{python[0]}{python[1]}"


def supported_tags(python: tuple[int, int]) -> list[Tag]:
    return [*cpython_tags(python, abis=[cp(python), "abi3", "none"], platforms=PLATFORMS),
            *compatible_tags(python, cp(python), platforms=PLATFORMS)]


def find_uv() -> str | None:
    cache = os.environ.get("NEBULA_CACHE", "/var/cache/nebula-dev")
    for candidate in (os.environ.get("UV"), shutil.which("uv"), f"{cache}/uv/bin/uv",
                      str(Path.home() / ".cache/nebula/uv/bin/uv")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def resolve(uv: str, infile: Path, lock: Path, python: tuple[int, int]) -> tuple[dict[str, Pin], str]:
    """The pins the .in resolves to now for `python` (the lock's pins preferred), and the index URL uv used."""
    with tempfile.TemporaryDirectory() as tmp:
        return _resolve(uv, infile, lock, python, Path(tmp) / "resolved.lock")


def _resolve(uv: str, infile: Path, lock: Path, python: tuple[int, int], out: Path) -> tuple[dict[str, Pin], str]:
    shutil.copyfile(lock, out)  # uv keeps the pins of an existing output file unless told to upgrade
    # Relative to the repository, as in the lock's header (the `# via -r` lines name it).
    shown = infile.relative_to(REPO) if infile.is_relative_to(REPO) else infile
    proc = subprocess.run([uv, "pip", "compile", "--quiet", "--emit-index-url", *compile_args(python), str(shown),
                           "-o", str(out)],
                          cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"check-engine-locks: {infile.name} does not resolve:\n{proc.stderr.strip()}")
    text = out.read_text()
    index = next((line.split()[1] for line in text.splitlines() if line.startswith("--index-url ")), "")
    if not index:
        raise SystemExit("check-engine-locks: uv named no index URL (--emit-index-url)")
    return parse_lock(text), index.rstrip("/")


def pin_diff(lock: dict[str, Pin], now: dict[str, Pin]) -> list[str]:
    problems = []
    for name in sorted(lock.keys() | now.keys()):
        was, is_ = lock.get(name), now.get(name)
        if was is None or is_ is None or was.version != is_.version:
            problems.append(f"stale lock: {name} {was.version if was else '(absent)'} in the lock, "
                            f"{is_.version if is_ else '(absent)'} resolved now")
    return problems


def index_files(index: str, name: str) -> list[dict[str, object]]:
    req = urllib.request.Request(f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        files: list[dict[str, object]] = json.load(resp)["files"]
    return files


def pick(pin: Pin, files: list[dict[str, object]], rank: dict[Tag, int], python: tuple[int, int]
         ) -> tuple[str, int, str] | str:
    """(file name, size, note) of what an install fetches for `pin`, or why nothing fits."""
    locked = {h.removeprefix("sha256:") for h in pin.hashes}
    best: tuple[int, str, int, str] | None = None
    sdist: tuple[str, int] | None = None
    version = canonicalize_version(pin.version)
    for f in files:
        fname, hashes = str(f["filename"]), f.get("hashes")
        if not isinstance(hashes, dict) or hashes.get("sha256") not in locked:
            continue
        size = f.get("size")
        size = size if isinstance(size, int) else 0
        note = " (yanked)" if f.get("yanked") else ""
        if not fname.endswith(".whl"):
            sdist = (fname, size)
            continue
        try:
            _, wversion, _, tags = parse_wheel_filename(fname)
        except InvalidWheelFilename:
            continue
        if canonicalize_version(str(wversion)) != version:
            continue
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, fname, size, note)
    if best is not None:
        return best[1], best[2], best[3]
    if sdist is not None:
        return sdist[0], sdist[1], " (sdist: built at install)"
    return (f"{pin.name}=={pin.version}: none of its {len(locked)} locked hashes is a {cp(python)} manylinux "
            "x86_64 wheel")


def file_lists(names: set[str], index: str, jobs: int) -> dict[str, list[dict[str, object]] | str]:
    """Each package's file list (or why it could not be read), fetched once for all the locks checked."""

    def one(name: str) -> list[dict[str, object]] | str:
        try:
            return index_files(index, name)
        except OSError as e:
            return f"{name}: the registry's file list could not be read: {e}"

    with ThreadPoolExecutor(jobs) as pool:
        return dict(zip(sorted(names), pool.map(one, sorted(names)), strict=True))


def check_files(pins: dict[str, Pin], files: dict[str, list[dict[str, object]] | str], python: tuple[int, int]
                ) -> tuple[list[str], int, list[str]]:
    rank = {t: i for i, t in enumerate(supported_tags(python))}
    problems, notes, total = [], [], 0
    sized = []
    for pin in pins.values():
        listed = files[pin.name]
        got = listed if isinstance(listed, str) else pick(pin, listed, rank, python)
        if isinstance(got, str):
            problems.append(got)
            continue
        total += got[1]
        sized.append((got[1], got[0]))
        if got[2]:
            notes.append(f"{got[0]}{got[2]}")
    largest = sorted(sized, reverse=True)[:8]
    notes += [f"{size / 2**30:6.2f} GiB  {fname}" for size, fname in largest]
    return problems, total, notes


def full_install(lock: Path, where: Path) -> int:
    env = {**os.environ, "NEBULA_ENGINE_CACHE": str(where / ".venvs")}
    t0 = time.monotonic()
    proc = subprocess.run([str(REPO / "scripts/install-engine.sh"), "--lock", str(lock), "--no-default",
                           str(where / "vllm")], env=env, check=False)
    if proc.returncode == 0:
        du = subprocess.run(["du", "-sb", str(where / ".venvs")], capture_output=True, text=True, check=False)
        size = int(du.stdout.split()[0]) if du.returncode == 0 else 0
        print(f"full install: {time.monotonic() - t0:.0f} s, {size / 2**30:.1f} GiB installed")
    return proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--in", dest="infile", type=Path, default=REPO / "packaging/engine/vllm-gpu.in")
    ap.add_argument("--lock", type=Path, action="append", default=None,
                    help="a lock to check (repeatable); default: the .in's <stem>-py3XX.lock files")
    ap.add_argument("--jobs", type=int, default=16, help="registry requests in flight")
    ap.add_argument("--full", nargs="?", const="", default=None, metavar="DIR",
                    help="also install this Python's lock for real (several GB) into DIR, default a temporary "
                         "directory")
    args = ap.parse_args()
    infile = args.infile.resolve()
    locks = [p.resolve() for p in args.lock] if args.lock else sorted(infile.parent.glob(f"{infile.stem}-py3*.lock"))
    if not locks:
        print(f"check-engine-locks: no {infile.stem}-py3XX.lock beside {infile}", file=sys.stderr)
        return 2
    found = {lock: lock_python(lock.read_text()) for lock in locks}
    pythons = {lock: py for lock, py in found.items() if py is not None}
    if (unknown := [lock.name for lock in locks if lock not in pythons]):
        print(f"check-engine-locks: {', '.join(unknown)}: no --python-version in the header", file=sys.stderr)
        return 2
    uv = find_uv()
    if uv is None:
        print("check-engine-locks: no uv: set UV, put uv on PATH or run scripts/test.sh once", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    pins = {lock: parse_lock(lock.read_text()) for lock in locks}
    with ThreadPoolExecutor(len(locks)) as pool:  # one resolver per lock, side by side
        resolved = dict(zip(locks, pool.map(lambda lock: resolve(uv, infile, lock, pythons[lock]),
                                            locks), strict=True))
    t_resolve = time.monotonic() - t0
    files = file_lists({p.name for ps in pins.values() for p in ps.values()}, next(iter(resolved.values()))[1],
                       args.jobs)
    failed = False
    for lock in locks:
        python = pythons[lock]
        stale = pin_diff(pins[lock], resolved[lock][0])
        file_problems, total, notes = check_files(pins[lock], files, python)
        for note in notes:
            print(f"  {note}")
        print(f"{lock.name}: {len(pins[lock])} pins, {'current' if not stale else 'STALE'} (resolved in "
              f"{t_resolve:.1f} s); download {total / 1e9:.2f} GB ({total / 2**30:.2f} GiB) of wheels for "
              f"{cp(python)} manylinux x86_64; checked in {time.monotonic() - t0:.1f} s")
        for p in stale + file_problems:
            print(f"FAIL: {p}")
        failed = failed or bool(stale or file_problems)
    if failed:
        return 1
    if args.full is not None:
        mine = [lock for lock in locks if pythons[lock] == sys.version_info[:2]]
        if not mine:
            print(f"check-engine-locks: --full: no lock checked is for this Python "
                  f"({sys.version_info[0]}.{sys.version_info[1]})", file=sys.stderr)
            return 2
        if args.full:
            return full_install(mine[0], Path(args.full).resolve())
        with tempfile.TemporaryDirectory(prefix="nebula-gpu-lock-") as tmp:
            return full_install(mine[0], Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
