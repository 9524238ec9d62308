"""What the chaos suite observes of a running cluster from outside: its processes (from /proc), its etcd
records, the gateway's health. Nothing here asks a Nebula service about itself except the gateway's /healthz."""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nebula.core import keys
from tests.harness.cluster import NebulaCluster, post_json
from tests.harness.etcd import etcd_get, etcd_list


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    cmdline: str


def cluster_processes(workdir: Path) -> list[Proc]:
    """Live (not zombie) processes started for the cluster in `workdir`: every service and engine process
    inherits NEBULA_CONFIG, which points into it."""
    marker = f"NEBULA_CONFIG={workdir}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if not any(v.startswith(marker) for v in env.split(b"\0")):
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            continue
        out.append(Proc(pid=int(d.name), ppid=int(fields[1]), sid=int(fields[3]), cmdline=cmdline))
    return out


def engine_processes(c: NebulaCluster) -> list[Proc]:
    """The cluster's engine processes (supervisors, vLLM, its workers): each engine runs in a session of its
    own, while the services (and CLI calls) share the test's session."""
    ours = os.getsid(0)
    return [p for p in cluster_processes(c.workdir) if p.sid != ours]


def nodes(c: NebulaCluster) -> tuple[str, ...]:
    return ("node-a", *c.extra_nodes)


def placed(c: NebulaCluster) -> dict[str, str]:
    """instance -> node, from the scheduler's placements in etcd."""
    out = {}
    for kv in etcd_list(c.etcd.endpoints, keys.PLACEMENTS):
        node, _, instance = kv["key"][len(keys.PLACEMENTS):].partition("/")
        out[instance] = node
    return out


@dataclass(frozen=True)
class Engine:
    node: str
    supervisor: int
    vllm: int | None
    """vLLM's API server: the supervisor's child (None before it started)."""


def engines(c: NebulaCluster) -> dict[str, Engine]:
    """instance -> its engine's processes, from the agents' pid files."""
    procs = engine_processes(c)
    out = {}
    for node in nodes(c):
        for instance, pid in c.engine_pids(node).items():
            child = next((p.pid for p in procs if p.ppid == pid and "vllm" in p.cmdline), None)
            out[instance] = Engine(node, pid, child)
    return out


def engine_restarts(before: dict[str, Engine], after: dict[str, Engine]) -> set[str]:
    """Instances whose engine processes are not the same ones as before."""
    return {i for i, e in before.items() if after.get(i) != e}


def orphans(c: NebulaCluster) -> list[Proc]:
    """Engine processes that belong to no placed instance's running engine (the session of a live
    supervisor of an instance placed on that supervisor's node)."""
    where = placed(c)
    sessions = {pid for node in nodes(c) for inst, pid in c.engine_pids(node).items() if where.get(inst) == node}
    return [p for p in engine_processes(c) if p.sid not in sessions]


def instances(c: NebulaCluster, model: str) -> dict[str, dict[str, Any]]:
    """instance -> its status record in etcd, for `model`."""
    return {i: st for i, (st, _) in instance_records(c, model).items()}


def instance_records(c: NebulaCluster, model: str) -> dict[str, tuple[dict[str, Any], int]]:
    """instance -> (its status record in etcd, the lease it is held by), for `model`."""
    out = {}
    for kv in etcd_list(c.etcd.endpoints, keys.INSTANCES):
        try:
            st = json.loads(kv["value"])
        except ValueError:
            continue  # the hostile-records fault's garbage
        if isinstance(st, dict) and st.get("model") == model and isinstance(st.get("instance"), str):
            out[st["instance"]] = (st, int(kv["lease"]))
    return out


def leader(c: NebulaCluster) -> dict[str, Any] | None:
    """The scheduler leader key's record (value: the leader's identity, `host:pid`)."""
    return etcd_get(c.etcd.endpoints, keys.SCHEDULER_LEADER)


def leader_service(c: NebulaCluster) -> str | None:
    """Which scheduler service (`scheduler`, `scheduler:2`) leads now."""
    kv = leader(c)
    if kv is None:
        return None
    pid = int(kv["value"].decode().rsplit(":", 1)[1])
    return next((s for s in c.services() if s.startswith("scheduler") and c.pid(s) == pid), None)


def node_lease(c: NebulaCluster, node: str) -> int | None:
    kv = etcd_get(c.etcd.endpoints, keys.node_key(node))
    return None if kv is None else int(kv["lease"])


def gateway_health(c: NebulaCluster) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(c.gateway_url + "/healthz", timeout=2) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
    except (OSError, ValueError):
        return None


def chat_ok(c: NebulaCluster, model: str) -> bool:
    try:
        status, _ = post_json(c.gateway_url + "/v1/chat/completions",
                              {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2},
                              timeout_s=30, key=c.extra_env.get("NEBULA_ADMIN_KEY"))
    except (OSError, ValueError):
        return False
    return status == 200
