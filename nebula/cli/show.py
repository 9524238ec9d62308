"""`nebula show MODEL [--json]`: one model's spec, its profile (what was read from its files, and what was
derived from what) and its replicas."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any, TextIO

from nebula.cli.client import EXIT_NOT_FOUND, EXIT_OK, AdminClient, CliError
from nebula.cli.views import MODEL_HEADER, model_rows, table

SPEC_FIELDS = ("source", "revision", "task", "replicas", "gpus_per_replica", "tensor_parallel_size",
               "gpu_memory_mib", "max_model_len", "engine_runtime", "engine_args", "trust_remote_code", "labels")


def add_show_parser(sub: Any) -> None:
    s = sub.add_parser("show", help="one model: its spec, profile (with what was derived from what) and replicas")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")


def shown(value: Any) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def _rows(values: Mapping[str, Any], keys: tuple[str, ...] | list[str], derived: Mapping[str, str]
          ) -> list[list[str]]:
    return [[k, shown(values.get(k)), f"<- {derived[k]}" if k in derived else ""] for k in keys]


def _indented(rows: list[list[str]]) -> list[str]:
    return ["  " + line for line in table(rows, ["", "", ""]).splitlines()[1:]]


def show_text(model: Mapping[str, Any]) -> str:
    """The model as GET /v1/admin/models/{name} returns it, for people. Every derived value is followed by
    `<- what it was derived from` (the profile's `derived` map)."""
    spec = model.get("spec") or {}
    profile = spec.get("profile") or {}
    derived: dict[str, str] = dict(profile.get("derived") or {})
    replicas = spec.get("replicas", "-")
    out = [f"MODEL {model['name']}  ({model.get('ready', 0)}/{replicas} replica(s) ready)"]
    if not spec:
        out.append("  unloading: its replicas drain, then stop")
    else:
        out += ["", "SPEC", *_indented(_rows(spec, SPEC_FIELDS, derived))]
        if profile:
            keys = [k for k in profile if k != "derived"]
            out += ["", "PROFILE (read from the model's files)", *_indented(_rows(profile, keys, derived))]
            rest = [k for k in derived if k not in SPEC_FIELDS and k not in profile]
            if rest:
                out += ["", "ALSO DERIVED", *_indented([[k, "", f"<- {derived[k]}"] for k in rest])]
        else:
            out += ["", "PROFILE", "  not read (the model's files were not read when it was loaded)"]
    if model.get("pending_reason"):
        out += ["", f"PENDING  {model['pending_reason']}"]
    rows = model_rows([model])
    out += ["", "REPLICAS", table(rows, MODEL_HEADER) if rows else "  none"]
    paths = [f"  {i['instance']}  {phase_path(i)}" for i in model.get("instances") or () if i.get("history")]
    if paths:
        out += ["", "HOW THEY GOT THERE (each earlier phase and how long it lasted)", *paths]
    return "\n".join(out)


def _lasted(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s} s" if s < 120 else f"{round(s / 60)} min"


def phase_path(instance: Mapping[str, Any]) -> str:
    """`downloading 40 s -> starting 85 s -> ready`: an instance's phase history (the agent's, newest last)."""
    steps = [(str(p), float(t)) for p, t in instance.get("history") or ()]
    ends = [t for _, t in steps[1:]] + [float(instance.get("since") or 0.0)]
    return " -> ".join([*(f"{p} {_lasted(end - t)}" for (p, t), end in zip(steps, ends, strict=True)),
                        str(instance.get("phase", "?"))])


def show(client: AdminClient, name: str, *, as_json: bool, out: TextIO) -> int:
    try:
        model = client.call("GET", f"/v1/admin/models/{urllib.parse.quote(name, safe='')}")
    except CliError as e:
        if e.code != EXIT_NOT_FOUND:
            raise
        raise CliError(_not_loaded(client, name), EXIT_NOT_FOUND) from None
    if as_json:
        print(json.dumps(model, indent=2, sort_keys=True), file=out)
    else:
        print(show_text(model), file=out)
    return EXIT_OK


def _not_loaded(client: AdminClient, name: str) -> str:
    """A model that is not loaded, with what the catalog would load under that name, when it has it."""
    try:
        found = client.call("GET", f"/v1/admin/catalog/{urllib.parse.quote(name, safe='')}")
    except CliError:
        return f"model '{name}' is not loaded (`nebula list` shows the loaded ones)"
    m = found["model"]
    return (f"model '{name}' is not loaded; the catalog has it: {m['source']} ({m['task']}, {m['size']} "
            f"{m['quant']}, {m['weights_gib']} GiB of weights): load it with `nebula load {m['name']}`")
