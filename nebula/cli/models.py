"""`nebula list | load | unload | scale`: the admin API, printed for people (or as JSON for scripts)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from nebula.cli.client import EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, AdminClient, CliError
from nebula.cli.elastic import default_replicas, scaling_request
from nebula.cli.views import MODEL_HEADER, model_rows, table, wait_line
from nebula.core.sources import SourceForm, source_form


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def local_source(source: str, cwd: Path) -> str:
    """--source as the admin API gets it: a relative directory made absolute (see `source_form`)."""
    text = source.strip()
    first = Path(cwd, text.split("/", 1)[0])
    form = source_form(text, exists=Path(cwd, text).is_dir(), first_part_exists="/" in text and first.is_dir())
    return str(Path(cwd, text).resolve()) if form is SourceForm.RELATIVE else source


def load_spec(args: argparse.Namespace, cwd: Path) -> dict[str, Any]:
    """The load request of `nebula load`: with no --source, NAME is a catalog name (the gateway resolves it);
    --size and --quant choose the catalog entry's variant; --task only when given (the catalog's otherwise)."""
    source = local_source(args.source, cwd) if args.source else args.name
    scaling = scaling_request(args)
    replicas = args.replicas if getattr(args, "replicas", None) is not None else default_replicas(scaling)
    spec: dict[str, Any] = {"name": args.name, "source": source, "replicas": replicas,
                            "engine_args": args.engine_args}
    if scaling is not None:
        spec["scaling"] = scaling
    for key in ("task", "size", "quant", "max_model_len", "engine_runtime", "gpus_per_replica"):
        if getattr(args, key, None):
            spec[key] = getattr(args, key)
    for flag in ("trust_remote_code", "allow_pending"):
        if getattr(args, flag, False):
            spec[flag] = True
    return spec


def check_wait(seconds: float) -> float:
    if not math.isfinite(seconds) or seconds < 0:
        raise CliError(f"--wait {seconds:g}: give the seconds to wait for a ready replica (0: do not wait)",
                       EXIT_USAGE)
    return seconds


def list_models(client: AdminClient, *, as_json: bool) -> int:
    models = client.call("GET", "/v1/admin/models")["data"]
    if as_json:
        print_json(models)
    elif not models:
        print("no models loaded (load one with `nebula load NAME --source PATH`)")
    else:
        print(table(model_rows(models), MODEL_HEADER))
    return EXIT_OK


class WaitDisplay:
    """The progress of `load --wait`: one line redrawn in place on a terminal, a line per change elsewhere."""

    def __init__(self, out: TextIO, tty: bool, width: int = 0) -> None:
        self.out = out
        self.tty = tty
        self.width = width
        self._last = ""

    def update(self, model: dict[str, Any], elapsed_s: float) -> None:
        if self.tty:
            line = wait_line(model, elapsed_s)
            self.out.write("\r\x1b[2K" + (line[: self.width - 1] if self.width > 1 else line))
            self._last = line
        else:
            line = wait_line(model, None, step=10)
            if line != self._last:
                self.out.write(f"{line}, {elapsed_s:.0f}s\n")
                self._last = line
        self.out.flush()

    def done(self) -> None:
        if self.tty and self._last:
            self.out.write("\n")
            self.out.flush()


def load(client: AdminClient, spec: dict[str, Any], *, wait_s: float, as_json: bool, out: TextIO,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    res = client.call("POST", "/v1/admin/models", spec)
    name = spec["name"]
    if wait_s <= 0:
        if as_json:
            print_json(res)
        else:
            print(f"model {name} {'loading' if res.get('created') else 'already loaded with this spec'}")
        return EXIT_OK
    if not as_json:
        print(f"model {name} {'loading' if res.get('created') else 'already loaded with this spec'}", flush=True)
    display = None if as_json else WaitDisplay(out, out.isatty(), shutil.get_terminal_size().columns)
    start = clock()
    try:
        model = _wait_ready(client, name, start + wait_s, display, clock, sleep)
    finally:
        if display:
            display.done()
    if as_json:
        print_json(model)
    else:
        print(f"model {name} is ready ({model['ready']}/{model['spec']['replicas']} replica(s) ready) "
              f"after {clock() - start:.0f} s")
    return EXIT_OK


def _wait_ready(client: AdminClient, name: str, deadline: float, display: WaitDisplay | None,
                clock: Callable[[], float], sleep: Callable[[float], None]) -> dict[str, Any]:
    start = clock()
    while True:
        model: dict[str, Any] = client.call("GET", f"/v1/admin/models/{name}")
        if display:
            display.update(model, clock() - start)
        if model.get("ready", 0) >= 1:
            return model
        failed = [i for i in model.get("instances", []) if i["phase"] == "failed"]
        if failed:
            raise CliError(f"model {name} failed on {failed[0]['node']}: {failed[0]['message']} "
                           f"(see `nebula logs {name}`)")
        if clock() > deadline:
            raise CliError(f"model {name} not ready after {deadline - start:.0f} s "
                           f"({wait_line(model, None)}); see `nebula logs {name}`", EXIT_TIMEOUT)
        sleep(1)


def unload(client: AdminClient, name: str, *, as_json: bool) -> int:
    res = client.call("DELETE", f"/v1/admin/models/{name}")
    if as_json:
        print_json(res)
    else:
        print(f"model {name} unloading (its engines drain, then stop)")
    return EXIT_OK


def scale(client: AdminClient, name: str, replicas: int, *, as_json: bool) -> int:
    res = client.call("PATCH", f"/v1/admin/models/{name}", {"replicas": replicas})
    if as_json:
        print_json(res)
    else:
        print(f"model {name} scaled to {res['model']['replicas']} replica(s)")
    return EXIT_OK
