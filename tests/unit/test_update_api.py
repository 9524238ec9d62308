"""PATCH /v1/admin/models/{name} as an update (nebula update), its progress, and node drains, over loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, NodeRecord, Placement, dumps
from nebula.core.rollout_records import RolloutState, RolloutStatus
from nebula.services.gateway.app import build_gateway_app
from tests.harness.gateway_server import GatewayServer

SPEC = ModelSpec(name="t", source="/srv/models/tiny", replicas=2)


@dataclass
class Api:
    store: MemoryStore
    gateway: GatewayServer
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        async with self.http.request(method, str(self.gateway.make_url(path)), data=data) as resp:
            return resp.status, await resp.json()

    async def spec(self, name: str = "t") -> ModelSpec | None:
        kv = await self.store.get(keys.model_key(name))
        return records.MODELS.decode(kv.key, kv.value) if kv is not None else None


def node(name: str) -> bytes:
    return dumps(NodeRecord(name=name, address="127.0.0.1", port_min=18000, port_max=18100).to_dict())


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    store = MemoryStore()
    await store.put(keys.model_key("t"), dumps(SPEC.to_dict()))
    await store.put(keys.node_key("n1"), node("n1"))
    gateway = GatewayServer(build_gateway_app(GatewayConfig(), store, CollectorRegistry()))
    await gateway.start_server()
    http = aiohttp.ClientSession()
    try:
        yield Api(store, gateway, http)
    finally:
        await http.close()
        await gateway.close()


async def test_an_update_writes_the_new_spec_and_its_rollout_record_then_refuses_a_second(api: Api) -> None:
    status, body = await api.call("PATCH", "/v1/admin/models/t", {"engine_args": ["--enforce-eager"]})
    assert status == 200 and body["updated"] is True, body
    assert body["changes"] == "engine_args: [] -> ['--enforce-eager']"
    spec = await api.spec()
    assert spec is not None and spec.engine_args == ("--enforce-eager",) and spec.replicas == 2
    record = await api.store.get(keys.rollout_key("t"))
    assert record is not None and records.ROLLOUTS.decode(record.key, record.value).previous == SPEC
    status, body = await api.call("PATCH", "/v1/admin/models/t", {"revision": "v2"})
    assert status == 409 and body["error"]["code"] == "update_in_progress"
    assert "model 't' is already being updated by admin" in body["error"]["message"]
    status, body = await api.call("GET", "/v1/admin/models/t/rollout")
    assert status == 200 and body["in_progress"] and body["text"] == "starting"


async def test_the_same_spec_is_a_no_op(api: Api) -> None:
    status, body = await api.call("PATCH", "/v1/admin/models/t", {"engine_args": []})
    assert status == 200 and body["updated"] is False
    assert await api.store.get(keys.rollout_key("t")) is None


@pytest.mark.parametrize("body, param", [
    ({"engine_args": ["--api-key=x"]}, "engine_args"),  # a flag no model may set ([engine] allowed_engine_args)
    ({"engine_args": "--enforce-eager"}, "engine_args"),
    ({"max_model_len": 0}, "max_model_len"),
    ({"engine_runtime": "vllm-9.9-cu12"}, "engine_runtime"),  # installed on no node
    ({"engine_runtime": "../x"}, "engine_runtime"),
    ({"source": "/other"}, "source"),
    ({"replicas": 3, "revision": "v2"}, "replicas"),
])
async def test_an_update_to_an_invalid_spec_is_a_400_and_changes_nothing(api: Api, body: dict[str, Any],
                                                                         param: str) -> None:
    status, answer = await api.call("PATCH", "/v1/admin/models/t", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert await api.spec() == SPEC and await api.store.get(keys.rollout_key("t")) is None


async def test_unknown_models_are_404(api: Api) -> None:
    assert (await api.call("PATCH", "/v1/admin/models/nope", {"revision": "v2"}))[0] == 404
    assert (await api.call("GET", "/v1/admin/models/nope/rollout"))[0] == 404


async def test_progress_reads_the_schedulers_status(api: Api) -> None:
    st = RolloutStatus(model="t", state=RolloutState.ROLLED_BACK, target="x", reason="new replica t:2 failed: oom")
    await api.store.put(keys.rollout_status_key("t"), dumps(st.to_dict()))
    status, body = await api.call("GET", "/v1/admin/models/t/rollout")
    assert status == 200 and not body["in_progress"] and body["text"] == "rolled back: new replica t:2 failed: oom"


async def test_draining_the_last_node_is_refused_unless_forced_and_undrain_takes_it_back(api: Api) -> None:
    p = Placement(instance="t", node="n1", model=ModelSpec(name="t", source="/srv/models/tiny"), port=18000)
    await api.store.put(keys.placement_key("n1", "t"), dumps(p.to_dict()))
    status, body = await api.call("POST", "/v1/admin/nodes/n1/drain")
    assert status == 409 and body["error"]["code"] == "last_node"
    assert body["error"]["message"].startswith("model 't' runs on n1 and no other undrained live node can hold it")
    await api.store.put(keys.node_key("n2"), node("n2"))
    status, body = await api.call("POST", "/v1/admin/nodes/n1/drain", {})
    assert status == 200 and body["created"] and body["stopping"] == []
    status, body = await api.call("GET", "/v1/admin/drains")
    assert [(d["node"], d["state"], d["replicas_left"]) for d in body["data"]] == [("n1", "draining", ["t"])]
    await api.store.put(keys.placement_key("n2", "t:1"), dumps(Placement(
        instance="t:1", node="n2", model=p.model, port=18000).to_dict()))
    status, body = await api.call("POST", "/v1/admin/nodes/n2/drain", {"force": True})
    assert status == 200 and body["stopping"] == ["model 't' runs on n2 and no other undrained live node can hold it"]
    assert (await api.call("DELETE", "/v1/admin/nodes/n1/drain"))[0] == 200
    assert (await api.call("DELETE", "/v1/admin/nodes/n1/drain"))[0] == 404
    assert (await api.call("POST", "/v1/admin/nodes/n9/drain"))[0] == 404
    assert (await api.call("POST", "/v1/admin/nodes/n2/drain", {"force": "yes"}))[0] == 400


async def test_status_shows_drains_and_rollouts(api: Api) -> None:
    p = Placement(instance="t", node="n1", model=ModelSpec(name="t", source="/srv/models/tiny"), port=18000)
    await api.store.put(keys.placement_key("n1", "t"), dumps(p.to_dict()))
    await api.store.put(keys.node_key("n2"), node("n2"))
    assert (await api.call("POST", "/v1/admin/nodes/n1/drain"))[0] == 200
    assert (await api.call("POST", "/v1/admin/nodes/n2/drain", {"force": True}))[0] == 200
    st = RolloutStatus(model="t", state=RolloutState.ROLLING, target="x", replaced=1, total=2, surge="t:2")
    await api.store.put(keys.rollout_status_key("t"), dumps(st.to_dict()))
    status, body = await api.call("GET", "/v1/admin/status")
    assert status == 200
    assert {n["name"]: n.get("drain") for n in body["nodes"]} == {"n1": "draining", "n2": "drained"}
    assert [m.get("rollout") for m in body["models"]] == ["rolling 1/2 (waiting for t:2)"]
