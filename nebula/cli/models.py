"""`nebula list | load | unload | status`: the admin API, printed for people (or as JSON for scripts)."""

from __future__ import annotations

import json
import time
from typing import Any

from nebula.cli.client import AdminClient, CliError


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


def _model_rows(models: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for m in models:
        spec = m.get("spec") or {}
        desired = str(spec.get("replicas", 0)) if spec else "-"
        instances = m.get("instances") or []
        if not instances:
            rows.append([m["name"], spec.get("task", "-"), f"{m.get('ready', 0)}/{desired}", "pending", "-",
                         "-", "waiting for placement"])
        for i in instances:
            rows.append([m["name"], spec.get("task", "-"), f"{m.get('ready', 0)}/{desired}", i["phase"],
                         i["instance"], i["node"], i.get("message", "")])
    return rows


def list_models(client: AdminClient, *, as_json: bool) -> int:
    models = client.call("GET", "/v1/admin/models")["data"]
    if as_json:
        print(json.dumps(models, indent=2, sort_keys=True))
    elif not models:
        print("no models loaded (load one with `nebula load NAME --source PATH`)")
    else:
        print(_table(_model_rows(models), ["MODEL", "TASK", "READY", "PHASE", "INSTANCE", "NODE", "MESSAGE"]))
    return 0


def load(client: AdminClient, spec: dict[str, Any], *, wait_s: float, as_json: bool) -> int:
    res = client.call("POST", "/v1/admin/models", spec)
    name = spec["name"]
    if not as_json:
        print(f"model {name} {'loading' if res.get('created') else 'already loaded with this spec'}")
    if wait_s <= 0:
        if as_json:
            print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    deadline = time.monotonic() + wait_s
    last = ""
    while True:
        model = client.call("GET", f"/v1/admin/models/{name}")
        phases = sorted({i["phase"] for i in model.get("instances", [])})
        if model.get("ready", 0) >= 1:
            if as_json:
                print(json.dumps(model, indent=2, sort_keys=True))
            else:
                print(f"model {name} is ready ({model['ready']} replica(s))")
            return 0
        failed = [i for i in model.get("instances", []) if i["phase"] == "failed"]
        if failed:
            raise CliError(f"model {name} failed on {failed[0]['node']}: {failed[0]['message']}", 4)
        now = ",".join(phases) or "pending"
        if now != last and not as_json:
            print(f"  {name}: {now}")
            last = now
        if time.monotonic() > deadline:
            raise CliError(f"model {name} not ready after {wait_s:.0f} s (phase {now}); "
                           f"see `nebula logs {name}`", 5)
        time.sleep(1)


def unload(client: AdminClient, name: str) -> int:
    client.call("DELETE", f"/v1/admin/models/{name}")
    print(f"model {name} unloading (its engines drain, then stop)")
    return 0


def scale(client: AdminClient, name: str, replicas: int) -> int:
    res = client.call("PATCH", f"/v1/admin/models/{name}", {"replicas": replicas})
    print(f"model {name} scaled to {res['model']['replicas']} replica(s)")
    return 0


def status(client: AdminClient, *, as_json: bool) -> int:
    nodes = client.call("GET", "/v1/admin/nodes")["data"]
    models = client.call("GET", "/v1/admin/models")["data"]
    if as_json:
        print(json.dumps({"nodes": nodes, "models": models}, indent=2, sort_keys=True))
        return 0
    node_rows = []
    for n in nodes:
        gpus = n.get("gpus") or []
        mem = sum(g["memory_total_mib"] for g in gpus)
        used = sum(g["memory_used_mib"] for g in gpus)
        node_rows.append([n["name"], n["address"], str(len(gpus)),
                          f"{used}/{mem} MiB" if gpus else "-", n.get("agent_version", "")])
    print(_table(node_rows, ["NODE", "ADDRESS", "GPUS", "GPU MEMORY", "AGENT"]) if node_rows else "no nodes")
    print()
    print(_table(_model_rows(models), ["MODEL", "TASK", "READY", "PHASE", "INSTANCE", "NODE", "MESSAGE"])
          if models else "no models")
    return 0
