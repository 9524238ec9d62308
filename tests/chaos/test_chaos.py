"""Chaos suite: one fault at a time under steady load through the gateway (non-streaming and streaming chat),
each measured (requests failed, streams cut, engine restarts, time until fully ready again, orphan engine
processes) and held to its goal. The faults run in this file's order against one cluster (see rig.py), first on
a single-member etcd, then on three members (run the whole file: later faults build on earlier steps). The
figures are printed as a table at the end of the run.

Process mode, not the systemd sandbox: the sandbox runs the same services, but engines there take minutes each to
start and the suite needs two of them plus two restarts within CI's budget. What systemd adds is done as the units
do it: Restart=on-failure with RestartSec=2 by the harness's keeper, the cgroup clean-up by the process back-end
(it kills what is left of an engine's process group), WatchdogSec= by the supervisor's own watchdog
(engine.watchdog_s)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nebula.core import keys
from tests.chaos import hostile, probes
from tests.chaos.rig import LEASE_TTL_S, MODEL, Chaos, Measure
from tests.harness.cluster import NebulaCluster
from tests.harness.etcd import EtcdCluster

pytestmark = [pytest.mark.chaos, pytest.mark.engine, pytest.mark.etcd]

ENGINE_READY_S = 600.0
# The agent checks each engine every node.resync_s (1 s here), each check bounded by engine.health_timeout_s (5 s).
HEALTH_TIMEOUT_S = 5.0


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> float:
    """Seconds until `check()` is truthy."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def times_until(since: float, checks: dict[str, Callable[[], Any]], timeout_s: float) -> dict[str, float]:
    """Seconds from `since` until each check first held (all polled together, until every one has)."""
    seen: dict[str, float] = {}
    while len(seen) < len(checks):
        if time.monotonic() - since > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {set(checks) - set(seen)}")
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.monotonic() - since
        time.sleep(0.1)
    return seen


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def assert_nothing_lost(m: Measure) -> None:
    assert m.failed_chats == [], f"non-streaming requests failed: {m.failed_chats[:3]}"
    assert m.cut_streams == [], f"streams cut: {m.cut_streams[:3]}"
    assert m.failed_streams == [], f"streams failed: {m.failed_streams[:3]}"
    assert m.restarted == set(), f"engines restarted by a control-plane fault: {m.restarted}"
    assert m.orphans == [], f"orphan engine processes: {m.orphans}"
    assert m.outcomes, "no request ran during the fault: the load generator is stuck"


def test_gateway_sigkill(chaos: Chaos) -> None:
    c = chaos.cluster
    with chaos.fault("SIGKILL gateway") as m:
        m.start()
        c.crash("gateway")
        back = wait_for(lambda: probes.gateway_health(c) is not None, 60, "the gateway to answer again")
        m.note(f"restarted by the harness as Restart=on-failure (RestartSec=2) would; answering after {back:.1f} s")
    streams_in_flight = [o for o in chaos.load.in_flight_at(m.t0) if o.stream]
    failed = m.failed_chats + m.failed_streams
    # The port is closed until the restarted gateway has its first view of the cluster (app.py,
    # FIRST_LISTING_WAIT_S): a request in that window fails to connect, never with a 503 "not loaded yet".
    odd = [o for o in failed if o.error_type != "APIConnectionError"]
    assert odd == [], f"not a connection error: {odd[:3]}"
    assert all(o.ended <= m.t0 + back + 1.0 for o in failed), "requests failed after the gateway was back"
    assert len(m.cut_streams) <= len(streams_in_flight)
    assert m.restarted == set() and m.orphans == []


def kill_leading_scheduler(chaos: Chaos, fault: str) -> None:
    c = chaos.cluster
    with chaos.fault(fault) as m:
        svc = probes.leader_service(c)
        old = probes.leader(c)
        assert svc is not None and old is not None, f"no scheduler service leads: {old}"
        old_identity = old["value"]
        m.start()
        c.crash(svc)

        def taken_over() -> bool:
            kv = probes.leader(c)
            return kv is not None and kv["value"] != old_identity

        took = wait_for(taken_over, 60, "another scheduler to lead")
        m.note(f"{svc} led and was killed; {probes.leader_service(c)} leads {took:.1f} s later "
               f"(lease TTL {LEASE_TTL_S} s; standbys watch the leader key)")
    # The dead leader's lease expires within the TTL and the standby, watching the key, campaigns at once;
    # the slack covers etcd's lease expiry check and a loaded 2-core box.
    assert took <= LEASE_TTL_S + 1.5
    assert_nothing_lost(m)


def test_scheduler_leader_sigkill(chaos: Chaos) -> None:
    kill_leading_scheduler(chaos, "SIGKILL leading scheduler")


def test_node_agent_sigkill(chaos: Chaos) -> None:
    c = chaos.cluster
    with chaos.fault("SIGKILL node agent") as m:
        lease = probes.node_lease(c, "node-a")
        m.start()
        c.crash("node")
        back = wait_for(lambda: probes.node_lease(c, "node-a") not in (None, lease), 60, "node-a to register again")
        m.note(f"node-a's agent re-registered {back:.1f} s after its death and re-adopted its engine")
    assert_nothing_lost(m)


def key_works(c: NebulaCluster, token: str) -> bool:
    """Whether the gateway accepts `token` for an inference path. GET /v1/models goes through the same request
    pipeline (name, authenticate, admit) as a chat and is answered by the gateway itself: a chat accepted just
    before the revocation reached the gateway would add the engine's time under load to `refused`."""
    req = urllib.request.Request(c.gateway_url + "/v1/models", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError:
        return False


def admin(c: NebulaCluster, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(c.gateway_url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {c.extra_env['NEBULA_ADMIN_KEY']}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


def test_hostile_records(chaos: Chaos) -> None:
    """Garbage under every prefix, then a key revoked, a replica's record deleted and a model scaled, all
    straight in etcd (as another gateway or an operator with etcdctl would): every service goes on
    following the cluster, and each bad record is named once in the log of each service that reads it."""
    c = chaos.cluster
    ends = c.etcd.endpoints
    with chaos.fault("hostile records in etcd") as m:
        created = admin(c, "POST", "/v1/admin/keys", {"name": "doomed"})
        token, key_id = created["key"], created["id"]
        assert key_works(c, token)
        victim, (record, lease) = next((i, r) for i, r in probes.instance_records(c, MODEL).items()
                                       if r[0]["node"] == "node-b")
        pids = {s: c.pid(s) for s in c.services()}
        bad = hostile.garbage()
        m.start()
        for key, value in bad:
            hostile.put_raw(ends, key, value)
        hostile.delete_raw(ends, keys.apikey_key(key_id).encode())
        refused = wait_for(lambda: not key_works(c, token), 30, "the revoked key to be refused")
        hostile.delete_raw(ends, keys.instance_key(victim).encode())
        dropped = wait_for(lambda: (probes.gateway_health(c) or {}).get("ready_replicas") == 1, 30,
                           "the deleted replica to leave the gateway's choice")
        hostile.put_raw(ends, keys.instance_key(victim).encode(), json.dumps(record).encode(), lease)
        t_load = time.monotonic()
        c.cli("load", "ghost", "--source", "/nonexistent/ghost")
        c.cli("scale", "ghost", "2")
        wait_for(lambda: {"ghost", "ghost:1"} <= set(probes.placed(c)), 30, "the scaled model's two placements")
        placed = time.monotonic() - t_load  # two CLI calls included
        c.cli("unload", "ghost")
        wait_for(lambda: not {"ghost", "ghost:1"} & set(probes.placed(c)), 30, "the unloaded model's placements to go")
        for key, _ in bad:
            hostile.delete_raw(ends, key)
        m.note(f"{len(bad)} bad records under every prefix; then a key revoked in etcd was refused after "
               f"{refused:.2f} s, {victim}'s record deleted left the gateway's choice after {dropped:.2f} s, "
               f"a model loaded and scaled to 2 (two CLI calls) was placed {placed:.1f} s after the load")
    # wait_for times from just after the write; one probe (a chat, or /healthz) may add its own latency.
    assert refused <= 1.0, f"the revoked key was still accepted {refused:.2f} s later"
    assert dropped <= 1.0, f"the deleted replica was still chosen {dropped:.2f} s later"
    assert {s: c.pid(s) for s in c.services()} == pids, "a service restarted"
    assert_nothing_lost(m)
    logs = {f.stem: f.read_text(errors="replace") for f in c.workdir.glob("*.log")}
    for key, _ in bad:
        for svc in hostile.mirrored_by(key):
            count = logs[svc].count(f"{hostile.named(key)} (revision")
            assert count == 1, f"{svc} named {hostile.named(key)} {count} times"


def test_etcd_restart(chaos: Chaos) -> None:
    etcd = chaos.etcd
    assert not isinstance(etcd, EtcdCluster), "this fault is the single-member etcd's"
    with chaos.fault("restart etcd (single member)") as m:
        m.start()
        etcd.restart()
        m.note(f"etcd was away for {time.monotonic() - m.t0:.1f} s (SIGTERM, start on the same data)")
    assert_nothing_lost(m)


def test_grow_etcd_to_three_members(chaos: Chaos) -> None:
    """Not a fault: the operator grows etcd to three members, then restarts the services one at a time onto the
    new endpoints (a rolling restart). The load pauses only while the gateway restarts (it refuses connections
    meanwhile); no engine may restart, no request may fail."""
    c = chaos.cluster
    etcd = chaos.etcd
    assert not isinstance(etcd, EtcdCluster)
    with chaos.fault("(grow etcd to 3 members, rolling restart)") as m:
        m.start()
        c.etcd = EtcdCluster.grow(etcd, etcd.workdir.parent / "members")
        c.rewrite_config()
        for svc in c.services():
            if svc == "gateway":
                chaos.load.pause()
            try:
                restart_cleanly(chaos, svc)
            finally:
                chaos.load.resume()
        m.note("etcd grown by `member add` one member at a time; each service restarted (SIGTERM) once the "
               "previous one was fully ready; load paused only around the gateway's restart")
    assert_nothing_lost(m)


def restart_cleanly(chaos: Chaos, svc: str) -> None:
    """SIGTERM `svc`, start it again, wait until all is fully ready."""
    c = chaos.cluster
    kind, _, name = svc.partition(":")
    node = (name or "node-a") if kind == "node" else ""
    lease = probes.node_lease(c, node) if node else None
    c.kill(svc, signal.SIGTERM)
    c.start(svc)
    if node:  # until the new agent has registered, the old one's records only look ready
        wait_for(lambda: probes.node_lease(c, node) not in (None, lease), 60, f"{node} to register again")
    chaos.wait_ready(120)


def test_etcd_member_sigkill(chaos: Chaos) -> None:
    c = chaos.cluster
    etcd = chaos.etcd
    assert isinstance(etcd, EtcdCluster), "needs the three-member etcd"
    with chaos.fault("SIGKILL etcd member (of 3)") as m:
        # The worst member to lose: the raft leader, and every service's first endpoint.
        etcd.transfer_leadership(0)
        leader = probes.leader(c)
        leases = {n: probes.node_lease(c, n) for n in probes.nodes(c)}
        m.start()
        etcd.members[0].kill()
        time.sleep(LEASE_TTL_S + 3)  # longer than any lease lives without keepalives
        leader_after = probes.leader(c)
        leases_after = {n: probes.node_lease(c, n) for n in probes.nodes(c)}
        etcd.members[0].start()  # as etcd's own Restart= would; it rejoins with its data
        m.note(f"killed member 0 (raft leader, first endpoint) for {LEASE_TTL_S + 3} s; then restarted")
    assert leader is not None and leader_after is not None
    assert (leader_after["value"], leader_after["create_revision"]) == (leader["value"], leader["create_revision"]), \
        "scheduler leadership changed hands"
    assert leases_after == leases, "an agent lost its lease"
    assert_nothing_lost(m)


def test_scheduler_failover_with_three_etcd_members(chaos: Chaos) -> None:
    assert isinstance(chaos.etcd, EtcdCluster)
    kill_leading_scheduler(chaos, "SIGKILL leading scheduler (3 etcd)")


def test_engine_sigkill(chaos: Chaos) -> None:
    """The supervisor (the unit's main process) dies: what is left (vLLM) is killed, the engine restarted by the
    agent's restart book, while the other replica serves everything."""
    c = chaos.cluster
    with chaos.fault("SIGKILL engine supervisor", ready_timeout_s=ENGINE_READY_S) as m:
        inst, eng = next((i, e) for i, e in probes.engines(c).items() if e.node == "node-b")
        m.start()
        os.kill(eng.supervisor, signal.SIGKILL)
        gone = wait_for(lambda: not alive(eng.vllm), 30, "the orphaned vLLM to be killed")
        m.note(f"{inst}: supervisor killed; its vLLM (still serving) killed {gone:.1f} s later; restarts: "
               f"{probes.instances(c, MODEL)[inst].get('restarts')}")
    assert m.restarted == {inst}, f"restarted: {m.restarted}"
    assert m.failed_chats == [], f"non-streaming requests failed: {m.failed_chats[:3]}"
    assert m.failed_streams == [], f"streams failed before they started: {m.failed_streams[:3]}"
    # Only streams the killed engine was serving: open when it died, or started on it before its vLLM went.
    assert all(o.started <= m.t0 + gone for o in m.cut_streams), m.cut_streams
    assert m.orphans == []


def test_engine_sigstop(chaos: Chaos) -> None:
    """vLLM hangs (SIGSTOP: connections are accepted, nothing answers): the agent's check takes it out of
    `ready` so the gateway stops choosing it, the supervisor's watchdog kills it, the agent restarts it."""
    c = chaos.cluster
    with chaos.fault("SIGSTOP engine (hang)", ready_timeout_s=ENGINE_READY_S) as m:
        inst, eng = next((i, e) for i, e in probes.engines(c).items() if e.node == "node-a")
        assert eng.vllm is not None
        m.start()
        os.kill(eng.vllm, signal.SIGSTOP)
        t = times_until(m.t0, {
            "left": lambda: probes.instances(c, MODEL)[inst]["phase"] != "ready",
            "dropped": lambda: (probes.gateway_health(c) or {}).get("ready_replicas") == 1,
            "killed": lambda: not alive(eng.vllm)}, 120)
        left, killed = t["left"], t["killed"]
        m.note(f"{inst}: after SIGSTOP, left ready at {left:.1f} s, out of the gateway's choice at "
               f"{t['dropped']:.1f} s, killed by the supervisor's watchdog at {killed:.1f} s "
               f"(engine.watchdog_s {c.engine_watchdog_s:.0f} s)")
    # Leaving ready takes one failed check: up to engine.health_timeout_s, after up to node.resync_s.
    assert left <= HEALTH_TIMEOUT_S + 2 * c.node_resync_s + 3.0
    assert killed <= c.engine_watchdog_s + 2 * HEALTH_TIMEOUT_S + 2.0
    assert m.restarted == {inst}, f"restarted: {m.restarted}"
    assert m.failed_chats == [], f"non-streaming requests failed: {m.failed_chats[:3]}"
    assert m.failed_streams == [], f"streams failed before they started: {m.failed_streams[:3]}"
    # Streams on the hung engine break when it is killed; nothing started after it hung was sent there.
    assert all(o.started <= m.t0 for o in m.cut_streams), m.cut_streams
    assert m.orphans == []


def test_nothing_failed_between_faults(chaos: Chaos) -> None:
    quiet = chaos.quiet_outcomes()
    failed = [o for o in quiet if not o.ok]
    assert failed == [], f"requests failed while no fault was under way: {failed[:3]}"
    assert len(chaos.load.outcomes) > 50, "too little load to tell anything"
