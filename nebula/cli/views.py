"""What the CLI prints for people, as pure functions of the admin API's JSON (unit-tested without a gateway).

`status_frame` is one screen of `nebula status`, `status_problems` what makes it unhealthy, `wait_line` the
progress line of `nebula load --wait`, `model_rows` the rows of `nebula list`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

MODEL_HEADER = ["MODEL", "TASK", "READY", "PHASE", "INSTANCE", "NODE", "MESSAGE"]
NODE_HEADER = ["NODE", "STATE", "ADDRESS", "GPUS", "GPU MEMORY", "UTIL", "LABELS", "REPLICAS"]


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


def percent(fraction: float, step: int = 1) -> str:
    """`0.437` -> `43%`, floored to `step` so a plain log prints a line per step, not per poll."""
    pct = int(max(0.0, min(1.0, fraction)) * 100)
    return f"{pct - pct % step}%"


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _instance_message(i: Mapping[str, Any], step: int = 1, *, phase: bool = True) -> str:
    """The agent's message, led by the download's progress when there is one (`downloading 43%: ...`)."""
    progress = i.get("progress")
    msg = str(i.get("message") or "")
    if progress is None:
        return msg
    done = percent(float(progress), step)
    done = f"{i['phase']} {done}" if phase else done
    return f"{done}: {msg}" if msg else done


# An elastic model's state (core/elastic_state.py) where it has no replica at all.
_AT_ZERO = {"idle": "scaled to zero: its next request wakes it",
            "waking": "waking: requests are held until a replica is ready"}


def model_rows(models: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for m in models:
        spec = m.get("spec") or {}
        scale = m.get("scale") or {}
        wanted = scale.get("replicas", spec.get("replicas")) if spec else None
        ready = f"{m.get('ready', 0)}/{'-' if wanted is None else wanted}"
        task = str(spec.get("task", "-"))
        instances = m.get("instances") or []
        if not instances and m.get("state") in _AT_ZERO:  # an elastic model with no replica, on purpose
            message = _scale_message(scale) if m["state"] == "idle" and scale else _AT_ZERO[m["state"]]
            rows.append([m["name"], task, ready, m["state"], "-", "-", message])
        elif not instances:
            rows.append([m["name"], task, ready, "pending", "-", "-", _unplaced(m)])
        for i in instances:
            msg = _instance_message(i, phase=False) or ("unloading: draining" if not spec else "")
            rows.append([m["name"], task, ready, i["phase"], i["instance"], i["node"], msg])
        if instances and m.get("pending_reason"):  # some replicas placed, the others fit nowhere
            rows.append([m["name"], task, ready, "pending", "-", "-", _unplaced(m)])
        if m.get("rollout") and not str(m["rollout"]).startswith("done"):  # nebula update / node drain
            rows.append([m["name"], task, ready, "update", "-", "-", str(m["rollout"])])
    return rows


def _scale_message(scale: Mapping[str, Any]) -> str:
    reason = str(scale.get("reason") or "")
    return f"wakes on its next request ({reason})" if reason else "wakes on its next request"


def _unplaced(model: Mapping[str, Any]) -> str:
    reason = model.get("pending_reason")
    return f"waiting for placement: {reason}" if reason else "waiting for placement"


def wait_line(model: Mapping[str, Any], elapsed_s: float | None, *, step: int = 1) -> str:
    """`qwen: 0/2 ready [1 downloading, 1 starting], downloading 43%: fetching weights, 1m05s`.

    `elapsed_s=None` leaves the time out: a plain (non-TTY) log prints the line only when the rest changes.
    """
    spec = model.get("spec") or {}
    instances = sorted(model.get("instances") or [], key=lambda i: str(i["instance"]))
    line = f"{model['name']}: {model.get('ready', 0)}/{spec.get('replicas', '?')} ready"
    phases = Counter(str(i["phase"]) for i in instances)
    line += " [" + (", ".join(f"{n} {p}" for p, n in sorted(phases.items())) if phases else _unplaced(model)) + "]"
    busy = [i for i in instances if i["phase"] != "ready" and _instance_message(i)]
    if busy:
        line += ", " + _instance_message(busy[0], step)
    if elapsed_s is not None:
        line += f", {duration(elapsed_s)}"
    return line


def status_problems(data: Mapping[str, Any]) -> list[str]:
    """Why the cluster is unhealthy, one line each with where to look; empty when it is healthy."""
    etcd = data.get("etcd") or {}
    if not etcd.get("ok"):
        return [f"etcd is unreachable from the gateway ({etcd.get('error') or 'no answer'}); check "
                "cluster.etcd_endpoints and that etcd runs (`systemctl status etcd`)"]
    problems = []
    if not (data.get("scheduler") or {}).get("leader"):
        problems.append("no scheduler leader: nothing gets placed (`nebula logs scheduler`)")
    nodes = data.get("nodes") or []
    if not any(n.get("alive") for n in nodes):
        problems.append("no node agent is registered (start nebula-node, or `nebula node join` on a node)")
    for n in nodes:
        if not n.get("alive"):
            problems.append(f"node {n['name']} is lost: its agent stopped renewing its lease; its "
                            f"{n.get('placements', 0)} replica(s) move elsewhere after scheduler.node_grace_s")
    for m in data.get("models") or []:
        for i in m.get("instances") or []:
            if i["phase"] == "failed":
                problems.append(f"{i['instance']} failed on {i['node']}: {i.get('message') or '?'} "
                                f"(`nebula logs {m['name']}`)")
    return problems


def _node_row(n: Mapping[str, Any]) -> list[str]:
    if not n.get("alive"):
        return [n["name"], "LOST", "-", "-", "-", "-", "-", str(n.get("placements", 0))]
    gpus = n.get("gpus") or []
    total = sum(int(g["memory_total_mib"]) for g in gpus)
    used = sum(int(g["memory_used_mib"]) for g in gpus)
    mem = f"{used / 1024:.1f}/{total / 1024:.1f} GiB" if total else "-"
    # Memory held outside Nebula (other processes, the driver, engines still draining): placement leaves it be.
    outside = sum(int(g.get("memory_outside_mib") or 0) for g in gpus)
    if outside:
        mem += f" ({outside / 1024:.1f} outside)"
    # Busy fraction (0-1, as NVML reports it), when the node record carries one.
    utils = [float(g["utilization"]) for g in gpus if g.get("utilization") is not None]
    util = percent(sum(utils) / len(utils)) if utils else "-"
    labels = ",".join(f"{k}={v}" for k, v in sorted((n.get("labels") or {}).items())) or "-"
    return [n["name"], n.get("drain") or "alive", str(n.get("address", "-")), str(len(gpus)), mem, util, labels,
            str(n.get("placements", 0))]


def _control_plane(data: Mapping[str, Any] | None, url: str, error: str | None) -> list[list[str]]:
    if data is None:
        unknown = "unknown (no gateway to ask)"
        return [["gateway", "UNREACHABLE", f"{url}: {error or 'no answer'}"], ["etcd", "?", unknown],
                ["scheduler", "?", unknown], ["agents", "?", unknown]]
    gw = data.get("gateway") or {}
    rows = [["gateway", "ok", f"{url}, nebula {gw.get('version', '?')}, "
                              f"{gw.get('ready_replicas', 0)} ready replica(s) routable"]]
    etcd = data.get("etcd") or {}
    if not etcd.get("ok"):
        unknown = "unknown (etcd unreachable)"
        return [*rows, ["etcd", "UNREACHABLE", str(etcd.get("error") or "")], ["scheduler", "?", unknown],
                ["agents", "?", unknown]]
    rows.append(["etcd", "ok", f"answered in {etcd.get('latency_ms', 0):.1f} ms"])
    leader = (data.get("scheduler") or {}).get("leader")
    rows.append(["scheduler", "ok", f"leader {leader}"] if leader else ["scheduler", "NO LEADER", ""])
    nodes = data.get("nodes") or []
    alive = [n["name"] for n in nodes if n.get("alive")]
    lost = [n["name"] for n in nodes if not n.get("alive")]
    if lost:
        rows.append(["agents", f"{len(lost)} LOST", f"lost: {', '.join(lost)}; {len(alive)} alive"])
    else:
        rows.append(["agents", "ok" if alive else "NONE", f"{len(alive)} alive"])
    return rows


def status_frame(data: Mapping[str, Any] | None, *, url: str, error: str | None = None,
                 title: str = "", width: int | None = None) -> str:
    """One screen of `nebula status`. `data` is /v1/admin/status (None: the gateway did not answer, `error`
    says why); `width` clips every line, so a live redraw never wraps."""
    out = [title, ""] if title else []
    out += ["CONTROL PLANE", *("  " + line for line in table(_control_plane(data, url, error),
                                                              ["", "", ""]).splitlines()[1:])]
    if data is not None and data.get("nodes") is not None:
        nodes = data["nodes"]
        out += ["", "NODES", table([_node_row(n) for n in nodes], NODE_HEADER) if nodes else "  none"]
    if data is not None and data.get("models") is not None:
        models = data["models"]
        out += ["", "MODELS", table(model_rows(models), MODEL_HEADER) if models else "  none loaded"]
    if data is not None:
        problems = status_problems(data)
        out += ["", "PROBLEMS", *(f"  - {p}" for p in problems)] if problems else ["", "healthy"]
    if width is not None:
        out = [line[:width] for line in out]
    return "\n".join(out)
