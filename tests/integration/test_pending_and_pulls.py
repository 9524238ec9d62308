"""Against a real etcd (its own, so /nebula/ is ours): the scheduler leader's pending reasons reach
GET /v1/admin/models, and /v1/admin/pulls writes intents, shows the agents' reports and withdraws them.

The scheduler and the gateway run in-process on the real EtcdStore; nodes are records written under a lease,
as an agent's are, with GPUs this machine does not have.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.etcd import EtcdStore
from nebula.core import keys, records
from nebula.core.config import GatewayConfig
from nebula.core.model import Gpu, NodeRecord, dumps
from nebula.core.pulls import PullPhase, PullStatus
from nebula.services.cluster.mirror import Mirror, MirrorMetrics, MirrorSet
from nebula.services.gateway.app import build_gateway_app
from nebula.services.scheduler.scheduler import Scheduler
from tests.harness.etcd import EtcdServer
from tests.harness.gateway_server import GatewayServer

pytestmark = pytest.mark.etcd
GIB = 1024


@dataclass
class Stack:
    store: EtcdStore
    http: aiohttp.ClientSession
    gateway: GatewayServer
    lease: int

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        async with self.http.request(method, str(self.gateway.make_url(path)),
                                     data=None if body is None else json.dumps(body)) as resp:
            return resp.status, await resp.json()

    async def until(self, path: str, check: Any, timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            _, body = await self.call("GET", path)
            if check(body):
                return body
            if time.monotonic() > deadline:
                pytest.fail(f"GET {path} never satisfied the check; last: {body}")
            await asyncio.sleep(0.2)


def gpu_node(name: str, gpus: int, gib: int) -> bytes:
    return dumps(NodeRecord(name=name, address="127.0.0.1", port_min=18000, port_max=18010,
                            gpus=tuple(Gpu(i, "H100", gib * GIB, 0) for i in range(gpus))).to_dict())


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    etcd = EtcdServer.launch(tmp_path / "etcd")
    store = await EtcdStore.connect([etcd.endpoint], timeout=5.0)
    lease = await store.grant_lease(30)
    await store.put(keys.node_key("node-a"), gpu_node("node-a", 2, 16), lease=lease)
    await store.put(keys.node_key("node-b"), gpu_node("node-b", 1, 22), lease=lease)
    sched = Scheduler(store, "sched-1", lease_ttl_s=5, node_grace_s=30, resync_s=1, registry=CollectorRegistry())
    metrics = MirrorMetrics(CollectorRegistry())
    mirrors = MirrorSet([Mirror(store, records.MODELS, metrics, on_change=sched.on_models),
                         Mirror(store, records.NODES, metrics, on_change=sched.on_nodes),
                         Mirror(store, records.PLACEMENTS, metrics, on_change=sched.on_placements),
                         *sched.rollouts.mirrors(store, metrics)])
    tasks: list[asyncio.Task[None]] = mirrors.tasks()
    tasks.append(asyncio.create_task(sched.run()))
    gateway = GatewayServer(build_gateway_app(GatewayConfig(), store, CollectorRegistry()))
    await gateway.start_server()
    http = aiohttp.ClientSession(headers={"Content-Type": "application/json"})
    st = Stack(store, http, gateway, lease)
    try:
        await st.until("/v1/admin/models", lambda body: "data" in body)  # 503 until its mirrors (keys) load
        yield st
    finally:
        await http.close()
        await gateway.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()
        etcd.stop()


async def test_a_model_that_fits_nowhere_shows_why(stack: Stack) -> None:
    status, _ = await stack.call("POST", "/v1/admin/models", {"name": "big", "source": "org/big",
                                                              "gpus_per_replica": 1, "gpu_memory_mib": 40 * GIB})
    assert status == 200
    model = await stack.until("/v1/admin/models/big", lambda m: m["pending_reason"])
    assert model["pending_reason"] == "needs 40 GiB on one GPU; largest free is 22 GiB on node-b"
    assert model["instances"] == []
    listed = (await stack.call("GET", "/v1/admin/models"))[1]["data"]
    assert [m["pending_reason"] for m in listed] == ["needs 40 GiB on one GPU; largest free is 22 GiB on node-b"]

    # A bigger GPU joins: the model is placed and the reason goes away.
    await stack.store.put(keys.node_key("node-c"), gpu_node("node-c", 1, 80), lease=stack.lease)
    await stack.until("/v1/admin/models/big", lambda m: m["pending_reason"] is None)
    assert await stack.store.get(keys.model_status_key("big")) is None
    assert (await stack.store.get(keys.placement_key("node-c", "big"))) is not None


async def test_pulls_are_written_reported_and_withdrawn(stack: Stack) -> None:
    status, err = await stack.call("POST", "/v1/admin/pulls", {"source": "/models/x"})
    assert status == 400 and "only hub sources" in err["error"]["message"]
    status, err = await stack.call("POST", "/v1/admin/pulls", {"source": "org/m", "nodes": ["node-z"]})
    assert status == 404 and "no live node named node-z" in err["error"]["message"]
    status, err = await stack.call("POST", "/v1/admin/pulls", {"model": "absent"})
    assert status == 404 and "not loaded" in err["error"]["message"]

    status, created = await stack.call("POST", "/v1/admin/pulls", {"source": "hf://org/m", "revision": "v2"})
    assert status == 201
    assert created["source"] == "hf://org/m@v2" and created["nodes"] == ["node-a", "node-b"]
    pid = created["id"]
    pull = (await stack.call("GET", f"/v1/admin/pulls/{pid}"))[1]
    assert {n: s["phase"] for n, s in pull["nodes"].items()} == {"node-a": "waiting", "node-b": "waiting"}

    for node, phase, progress in (("node-a", PullPhase.READY, 1.0), ("node-b", PullPhase.DOWNLOADING, 0.5)):
        report = PullStatus(id=pid, node=node, source="hf://org/m@v2", phase=phase, message="m", progress=progress)
        await stack.store.put(keys.pull_status_key(node, pid), dumps(report.to_dict()), lease=stack.lease)
    pull = (await stack.call("GET", f"/v1/admin/pulls/{pid}"))[1]
    assert pull["nodes"]["node-a"]["phase"] == "ready" and pull["nodes"]["node-b"]["progress"] == 0.5
    assert [p["id"] for p in (await stack.call("GET", "/v1/admin/pulls"))[1]["data"]] == [pid]

    status, _ = await stack.call("DELETE", f"/v1/admin/pulls/{pid}")
    assert status == 200
    assert not (await stack.store.list_prefix(keys.PULLS)).items
    assert (await stack.call("GET", f"/v1/admin/pulls/{pid}"))[0] == 404
