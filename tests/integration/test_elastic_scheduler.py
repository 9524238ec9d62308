"""Elastic capacity, the scheduler's side, with real processes and a real etcd: load reports and wake requests are
written as a gateway worker writes them, and the scheduler leader's scale states and placements are read back.

The model's source does not exist, so its replicas fail at once on the node: only the scheduler's decisions
matter here (the gateway's side, holding requests and creating wake requests, is tested with it). Windows are
seconds long through NEBULA_SCHEDULER_* overrides; the scheduler's own clock is the wall clock.

The fence on scale writes runs against the real etcd too, deterministically, with an in-process scheduler whose
lease is revoked under it (a process paused past its lease either steps down first or has its pass refused;
tests/integration/test_deposed_leader.py shows the pause itself).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.etcd import EtcdStore
from nebula.core import keys
from nebula.core.elastic import LoadReport, ModelLoad, ScaleState, WakeRequest
from nebula.core.model import ModelSpec, NodeRecord, dumps
from nebula.services.cluster.mirror import MirrorMetrics, MirrorSet
from nebula.services.cluster.writes import Fence
from nebula.services.scheduler.scheduler import Scheduler
from tests.chaos import probes
from tests.harness.cluster import NebulaCluster, running_cluster, wait_until
from tests.harness.etcd import EtcdServer, etcd_call, etcd_get
from tests.unit.fake_engine import until

pytestmark = pytest.mark.etcd

FAST = {"NEBULA_SCHEDULER_SCALE_UP_WINDOW_S": "2", "NEBULA_SCHEDULER_SCALE_DOWN_WINDOW_S": "3",
        "NEBULA_SCHEDULER_SCALE_COOLDOWN_S": "2", "NEBULA_SCHEDULER_SCALING_PASS_S": "0.5",
        "NEBULA_SCHEDULER_TARGET_INFLIGHT": "2", "NEBULA_SCHEDULER_LOAD_REPORT_STALE_S": "10"}
IDLE_S = 6


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def put(c: NebulaCluster, key: str, value: dict[str, Any]) -> None:
    etcd_call(c.etcd.endpoints[0], "/v3/kv/put", {"key": _b64(key), "value": _b64(json.dumps(value))})


def scale(c: NebulaCluster, model: str) -> ScaleState | None:
    kv = etcd_get(c.etcd.endpoints, keys.scale_key(model))
    return None if kv is None else ScaleState.from_dict(json.loads(kv["value"]))


def replicas(c: NebulaCluster, model: str) -> set[str]:
    return {i for i in probes.placed(c) if i.split(":")[0] == model}


class Gateway:
    """A gateway worker's load report, published every 0.5 s while the block runs, with the load the test sets."""

    def __init__(self, c: NebulaCluster) -> None:
        self.c = c
        self.load = ModelLoad()
        self.stop = threading.Event()

    def publish(self) -> None:
        r = LoadReport(reporter="test-gw.1", at=time.time(), models={"el": self.load})
        put(self.c, keys.load_key(r.reporter), r.to_dict())

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.publish()


@contextmanager
def gateway_worker(c: NebulaCluster) -> Iterator[Gateway]:
    gw = Gateway(c)
    gw.publish()
    thread = threading.Thread(target=gw.run, daemon=True)
    thread.start()
    try:
        yield gw
    finally:
        gw.stop.set()
        thread.join(5)


def decisions(c: NebulaCluster, svc: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{c.ports[svc]}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for m in re.finditer(r'^nebula_scheduler_scaling_decisions_total\{action="(\w+)",model="el"\} (\S+)$', text, re.M):
        out[m[1]] = float(m[2])
    return out


def test_load_idle_and_wake_drive_an_elastic_model(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "etcd").mkdir()
    with running_cluster(tmp_path / "c", tmp_path / "etcd", extra_schedulers=1, extra_env=FAST) as c, \
            gateway_worker(c) as gw:
        c.cli("load", "el", "--source", "/nonexistent/el", "--min-replicas", "0", "--max-replicas", "2",
              "--idle-unload", f"{IDLE_S}s")
        wait_until(lambda: replicas(c, "el") == {"el"}, 30, "the first replica placed", c)
        st = scale(c, "el")
        assert st is not None and st.replicas == 1 and st.reason == "loaded with 1 replica"

        # A load step: 6 in flight (3 per replica at 2, above the target 2) -> 2 replicas.
        t0 = time.monotonic()
        gw.load = ModelLoad(inflight=6, last_request=time.time())
        wait_until(lambda: replicas(c, "el") == {"el", "el:1"}, 30, "a second replica for the load", c)
        up_s = time.monotonic() - t0
        st = scale(c, "el")
        assert st is not None and st.replicas == 2 and "1 -> 2 replicas" in st.reason

        # Load gone, but requests recent: back to 1 (autoscaling never goes to 0 by itself).
        t0 = time.monotonic()
        gw.load = ModelLoad(inflight=0, last_request=time.time())
        wait_until(lambda: replicas(c, "el") == {"el"}, 30, "back to one replica", c)
        down_s = time.monotonic() - t0
        # A stream still running keeps it loaded past idle_unload_s.
        gw.load = ModelLoad(inflight=1, last_request=time.time())
        time.sleep(IDLE_S + 2)
        st = scale(c, "el")
        assert replicas(c, "el") == {"el"} and st is not None and st.replicas == 1

        # Nothing in flight and no request for idle_unload_s: unloaded, idle (not pending).
        t0 = time.monotonic()
        gw.load = ModelLoad(inflight=0, last_request=time.time())
        wait_until(lambda: not replicas(c, "el"), IDLE_S + 20, "the idle model unloaded", c)
        idle_s = time.monotonic() - t0
        st = scale(c, "el")
        assert st is not None and st.replicas == 0 and st.reason.startswith("idle: no inference request")
        listed = json.loads(c.cli("list", "--json").stdout)
        (m,) = [m for m in listed if m["name"] == "el"]
        assert m["scale"]["state"] == "idle" and m["pending_reason"] is None

        # A wake request (as a gateway holding a request creates it): one replica, and the request is deleted.
        t0 = time.monotonic()
        put(c, keys.wake_key("el"), WakeRequest(model="el", at=time.time(), by="test-gw.1").to_dict())
        gw.load = ModelLoad(held=3, last_request=time.time())
        wait_until(lambda: replicas(c, "el") == {"el"} and etcd_get(c.etcd.endpoints, keys.wake_key("el")) is None,
                   30, "woken, and the wake request deleted", c)
        wake_s = time.monotonic() - t0
        st = scale(c, "el")
        assert st is not None and st.replicas == 1 and st.reason.startswith("woken by a wake request")

        leader = probes.leader_service(c)
        assert leader is not None
        counts = decisions(c, leader)
        print(f"\nelastic scheduler: 1->2 after {up_s:.1f}s (window 2s), 2->1 after {down_s:.1f}s (window 3s), "
              f"idle unload after {idle_s:.1f}s (idle_unload_s {IDLE_S}), wake placed in {wake_s:.2f}s; "
              f"decisions {counts}")
        assert counts == {"up": 1.0, "down": 1.0, "unload": 1.0, "wake": 1.0}
        c.cli("unload", "el")


async def test_a_deposed_leaders_scale_write_is_refused_by_real_etcd(tmp_path: Path) -> None:
    etcd = EtcdServer.launch(tmp_path / "etcd")
    store = await EtcdStore.connect([etcd.endpoint], timeout=5.0)
    sched = Scheduler(store, "sched-1", lease_ttl_s=30, node_grace_s=30, resync_s=1, registry=CollectorRegistry())
    mirrors = MirrorSet(sched.mirrors(store, MirrorMetrics(CollectorRegistry())))
    tasks = mirrors.tasks()
    try:
        node_lease = await store.grant_lease(30)
        await store.put(keys.node_key("n1"), dumps(NodeRecord(name="n1", address="127.0.0.1", port_min=18000,
                                                              port_max=18010).to_dict()), lease=node_lease)
        spec = ModelSpec.from_dict({"name": "el", "source": "/m", "scaling": {"idle_unload_s": 600}})
        await store.put(keys.model_key("el"), dumps(spec.to_dict()))
        await store.put(keys.scale_key("el"), dumps(ScaleState(model="el", replicas=0, reason="idle").to_dict()))
        lease = await store.grant_lease(30)
        assert await store.create(keys.SCHEDULER_LEADER, b"sched-1", lease=lease)
        sched._fence = Fence(lease)
        await store.revoke_lease(lease)  # its lease ran out: another may lead now
        await store.put(keys.wake_key("el"), dumps(WakeRequest(model="el", at=time.time()).to_dict()))
        await until(lambda: sched.ready and "el" in sched.scaler.wakes, within_s=10)
        await sched.schedule_once()
        st = await store.get(keys.scale_key("el"))
        assert st is not None and ScaleState.from_dict(json.loads(st.value)).replicas == 0
        assert await store.get(keys.wake_key("el")) is not None  # not acted on, so not deleted
        assert not (await store.list_prefix(keys.PLACEMENTS)).items
        assert sched.fenced_writes == 1
    finally:
        for t in tasks:
            t.cancel()
        await store.close()
        etcd.stop()

