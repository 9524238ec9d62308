"""A deposed scheduler leader can change nothing: real processes, real etcd, SIGSTOP past the lease.

The leader is paused (a long GC pause, a frozen VM) past its lease; the standby takes over and swaps the
model for another while the old leader sleeps. When the old one resumes, its mirrors deliver what it
missed while its keepalive finds the lease gone; whichever of the two its event loop runs first, nothing
it writes may land: every placement keeps the revision the new leader gave it. (Here the keepalive has
been seen to win, so the old leader steps down without a pass. The other order, a pass on the stale view
first, is pinned down deterministically in tests/unit/test_cluster_mirror.py against the store twin, and
the fence itself runs against real etcd in the store contract, `test_commit_fenced_by_a_lease`.)

No engine runs: the sources do not exist, so replicas fail at once; only their placements matter here.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from nebula.core import keys
from tests.chaos import probes
from tests.harness.cluster import NebulaCluster, running_cluster, wait_until
from tests.harness.etcd import etcd_list

pytestmark = pytest.mark.etcd

LEASE_TTL_S = 5  # the harness's cluster.lease_ttl_s


def placements(c: NebulaCluster) -> dict[str, int]:
    """Placement key -> its mod_revision: any write that lands changes one."""
    return {kv["key"]: kv["mod_revision"] for kv in etcd_list(c.etcd.endpoints, keys.PLACEMENTS)}


def fenced_passes(c: NebulaCluster, svc: str) -> float:
    port = c.ports[svc]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("nebula_scheduler_fenced_passes_total "):
                return float(line.split()[1])
    raise AssertionError(f"{svc} exposes no nebula_scheduler_fenced_passes_total")


def test_a_leader_paused_past_its_lease_writes_nothing_when_it_resumes(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "etcd").mkdir()
    with running_cluster(tmp_path / "c", tmp_path / "etcd", extra_schedulers=1) as c:
        c.cli("load", "old", "--source", "/nonexistent/old", "--replicas", "2")
        wait_until(lambda: {"old", "old:1"} <= set(probes.placed(c)), 30, "the first model placed", c)
        wait_until(lambda: probes.leader_service(c) is not None, 30, "a leader", c)
        old_leader = probes.leader_service(c)
        assert old_leader is not None
        identity = (probes.leader(c) or {})["value"]
        pid = c.pid(old_leader)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            # While it sleeps: its lease runs out, the standby leads, and the placements change under it.
            wait_until(lambda: (probes.leader(c) or {}).get("value") not in (None, identity), 3 * LEASE_TTL_S,
                       "the standby to take over", c)
            c.cli("unload", "old")
            c.cli("load", "new", "--source", "/nonexistent/new", "--replicas", "2")
            wait_until(lambda: set(probes.placed(c)) == {"new", "new:1"}, 30, "the new leader's placements", c)
            settled = placements(c)
        finally:
            os.kill(pid, signal.SIGCONT)
        # The old leader catches up with what it missed; for a while it still believes it leads.
        time.sleep(3 * LEASE_TTL_S / 3 + 2)
        assert placements(c) == settled, "a placement written by the deposed leader landed"
        new_leader = probes.leader_service(c)
        assert new_leader is not None and new_leader != old_leader
        refused = fenced_passes(c, old_leader)
        print(f"deposed leader {old_leader}: {refused:.0f} pass(es) refused by the fence; placements unchanged")
        assert c.pid(old_leader) == pid, "the deposed leader should step down, not die"
