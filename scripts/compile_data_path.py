#!/usr/bin/env python3
"""Compile the gateway's data-path modules with mypyc (part of mypy), in a copy of the tree (issue 18).

What is left of the gateway's cost per request is Python bytecode, spread over some 400 calls with no function
above a few percent; mypyc turns a typed module into a C extension that does the same with fewer instructions.
The modules listed here are the gateway's request path as its data-plane server runs it, from the request's
bytes to the relay of the engine's answer. Measured on a 2-core AMD EPYC (issue 18): scripts/bench_request_path.py
(the gateway's Python alone, in one process) 50 us a whole answer from source, 20 compiled; 105 and 61 us a
32-token stream. scripts/bench_gateway.py (the whole gateway process, system calls included), against the first
compiled build (parsing, request rules and relay: 37 us in one process) in the same three runs: 0.80-1.14x the
CPU, 0.95 at the median of 21 figures; non-streamed requests at c=64 0.80-0.89x, now at vllm-router's CPU
per request (0.84-1.15x in six runs). The last three modules (nebula/core's on the path) took 1.3 us off in one
process, which three full runs cannot resolve (0.83-1.18x against the build without them, 1.00 at the median).

    .venv/bin/python scripts/compile_data_path.py DIR          # compile DIR's copies in place (.so beside .py)
    .venv/bin/python scripts/compile_data_path.py DIR --clean  # remove what it built
    python scripts/compile_data_path.py DIR --install SITE     # and copy it into SITE (a venv's site-packages)
    SITE's python scripts/compile_data_path.py --check SITE    # exit 1 unless that Python loads them from SITE

DIR is a copy of the repository (`git archive HEAD | tar -x -C DIR`), never the working tree: Python imports an
extension module before its .py, so a built module left in the working tree would hide every edit to its
source. scripts/build-deb.sh compiles its copy of the source this way and installs the result into the package's
venv (--install); scripts/bench_gateway.py --nebula-src DIR runs a gateway from such a copy; tests/integration/
test_compiled_data_path.py runs the unit suite against one. The Python that runs this script compiles
for its own version and needs mypy, setuptools and the gateway's dependencies (for their types), with gcc
and the version's python3-dev.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

# The modules compiled: the gateway's whole request path as the data-plane server runs it, from the bytes of a
# request (the server's connection, the head's parser, the route, the request pipeline's name, key and
# admission, the request rules) through the handler, the pick of a replica and the engine client to the
# relay of the answer and its metrics, and the three modules of nebula/core it calls (the field checks' helpers,
# the key's hash, the pick's scoring), which every service then imports compiled. What stays Python on that path
# is the Date header's cache, the engine-load lookup, asyncio's task bookkeeping and a NamedTuple's constructor:
# about 1.5 us a request under cProfile (scripts/bench_request_path.py --profile on a build).
# Writing a compiled module (each still passes mypy --strict and runs from source, where tests import it):
#   - an annotation is a check for the types mypyc knows (builtins, compiled classes): `float` makes an int a
#     float (request_rules says int | float where an int must stay exact). Other classes are not checked, so
#     uvloop's transports (which derive from no asyncio class) pass where asyncio.Transport is named;
#   - one name is one type per function: `except A as e` then `except B as e` is a TypeError at the second
#     (name them apart);
#   - a function nested two deep loses its closure's names (dataplane.py's routes are made at module level),
#     and `continue` out of a `with` does not compile (forward.py tries each replica in a function of its own);
#   - a compiled class's methods cannot be replaced on an instance (monkeypatching): pass a dependency in;
#   - a dataclass's generated __init__ (and a NamedTuple's __new__) stays bytecode: 170-180 ns for a dataclass
#     of a few fields, frozen or not, against 20-40 for a class with an __init__ of its own, so the value types
#     made per request (FastRequest, Admitted, Call, Exchange, RelayStats, Target) are plain classes with
#     __slots__ (Final attributes where a frozen dataclass was);
#   - a module-level constant read in a function is a dict lookup each time unless it is Final (then a C
#     global, or inlined for a literal): the constants these modules read are Final.
# tests/integration/test_compiled_data_path.py runs the whole unit suite against a compiled build, which is
# where a module that breaks one of these shows.
MODULES = (
    "nebula/adapters/http1_request.py",
    "nebula/adapters/http1_parser.py",
    "nebula/adapters/upstream_http.py",
    "nebula/adapters/upstream_response.py",
    "nebula/adapters/deadlines.py",
    "nebula/services/http/fastconnection.py",
    "nebula/services/http/fastrequest.py",
    "nebula/services/http/connection_reply.py",
    "nebula/services/http/relay.py",
    "nebula/services/gateway/dataplane.py",
    "nebula/services/gateway/pipeline.py",
    "nebula/services/gateway/auth.py",
    "nebula/services/gateway/exchange.py",
    "nebula/services/gateway/request_rules.py",
    "nebula/services/gateway/validation.py",
    "nebula/services/gateway/openai_api.py",
    "nebula/services/gateway/lora_routing.py",
    "nebula/services/gateway/forward.py",
    "nebula/services/gateway/replicas.py",
    "nebula/services/gateway/load_report.py",
    "nebula/services/gateway/loop_metrics.py",
    "nebula/core/fields.py",
    "nebula/core/apikeys.py",
    "nebula/core/routing.py",
)


def built(tree: Path) -> list[Path]:
    """The extension modules a compile left in `tree`: one per module, and mypyc's shared runtime at the top."""
    modules = [p for m in MODULES for p in (tree / m).parent.glob(Path(m).stem + ".*.so")]
    return sorted([*tree.glob("*__mypyc.*.so"), *modules])


def clean(tree: Path) -> None:
    for path in built(tree):
        path.unlink()
    shutil.rmtree(tree / "build", ignore_errors=True)


def compile_tree(tree: Path, python: str = sys.executable) -> list[Path]:
    """Build MODULES of `tree` in place; returns the extension modules. Raises SystemExit with mypyc's own
    words when a module does not compile."""
    tree = tree.resolve()
    if (tree / ".git").exists():
        raise SystemExit(f"{tree} is a working tree: compile a copy (git archive HEAD | tar -x -C DIR)")
    missing = [m for m in MODULES if not (tree / m).is_file()]
    if missing:
        raise SystemExit(f"{tree} is not a copy of the repository: no {missing[0]}")
    clean(tree)
    done = subprocess.run([python, "-m", "mypyc", *MODULES], cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mypyc failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    shutil.rmtree(tree / "build", ignore_errors=True)  # the C sources and objects: 30 MB nothing imports
    out = built(tree)
    if len(out) != len(MODULES) + 1:
        raise SystemExit(f"mypyc built {[p.name for p in out]}, not one module each of {list(MODULES)}")
    return out


def install(tree: Path, site: Path) -> list[Path]:
    """Copy what compile_tree built in `tree` to the same places under `site`, where the modules' .py already
    are (an installed nebula); returns the copies."""
    tree, out = tree.resolve(), []
    for path in built(tree):
        target = site / path.relative_to(tree)
        if path.parent != tree and not target.with_name(path.name.split(".")[0] + ".py").is_file():
            raise SystemExit(f"{target.parent} has no {path.name.split('.')[0]}.py: is {site} an installed nebula?")
        shutil.copyfile(path, target)
        out.append(target)
    return out


def loads_compiled(site: Path) -> list[str]:
    """The MODULES this Python does not load as extension modules from `site` (none: all is well)."""
    wrong = []
    for module in MODULES:
        name = module[:-3].replace("/", ".")
        file = getattr(importlib.import_module(name), "__file__", None) or ""
        if not (file.startswith(str(site.resolve())) and file.endswith(".so")):
            wrong.append(f"{name} from {file}")
    return wrong


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", type=Path, nargs="?", help="a copy of the repository")
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules instead")
    ap.add_argument("--install", type=Path, metavar="SITE", help="copy them into SITE, where nebula is installed")
    ap.add_argument("--check", type=Path, metavar="SITE", help="check that this Python loads them from SITE")
    args = ap.parse_args()
    if args.check:
        wrong = loads_compiled(args.check)
        if wrong:
            raise SystemExit("not loaded compiled: " + ", ".join(wrong))
        return
    if args.tree is None:
        ap.error("a copy of the repository (DIR) is needed")
    if args.clean:
        clean(args.tree)
        return
    paths = compile_tree(args.tree)
    for path in install(args.tree, args.install) if args.install else paths:
        print(path)


if __name__ == "__main__":
    main()
