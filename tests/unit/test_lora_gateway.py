"""LoRA adapters at the gateway: the admin API's checks, requests routed by adapter name only to replicas
that have it loaded, /v1/models with parents, and keys limited to models (against fake engines)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.apikeys import KeyRequest, digest
from nebula.core.config import GatewayConfig
from nebula.core.lora import AdapterSpec
from nebula.core.model import InstanceStatus, ModelSpec, Phase, dumps
from nebula.services.cluster.writes import ClusterWrites, Refused
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, engines, until

BASE = ModelSpec(name="base", source="org/base", replicas=2,
                 engine_args=("--enable-lora", "--max-lora-rank=8", "--max-loras=2"))
PLAIN = ModelSpec(name="plain", source="org/plain")


@dataclass
class Gw:
    store: MemoryStore
    server: GatewayServer
    http: aiohttp.ClientSession
    a: FakeEngine
    b: FakeEngine

    async def call(self, method: str, path: str, body: object = None, key: str | None = None
                   ) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = json.dumps(body).encode() if body is not None else None
        async with self.http.request(method, str(self.server.make_url(path)), data=data, headers=headers) as resp:
            text = await resp.read()
            return resp.status, dict(resp.headers), json.loads(text) if text else None

    async def replica(self, instance: str, engine: FakeEngine, adapters: tuple[str, ...] = (),
                      errors: tuple[tuple[str, str], ...] = ()) -> None:
        st = InstanceStatus(instance=instance, model="base", node="n1", phase=Phase.READY, endpoint=engine.endpoint,
                            adapters=adapters, adapter_errors=errors)
        await self.store.put(keys.instance_key(instance), dumps(st.to_dict()))

    async def adapter(self, name: str, source: str = "/adapters/x") -> None:
        await self.store.put(keys.adapter_key(name), dumps(AdapterSpec(name, "base", source).to_dict()))

    def synced(self) -> bool:
        return self.state_has("tone", {"base"}) and len(self.server.app[GATEWAY].view.models) == 2

    def state_has(self, adapter: str, instances: set[str]) -> bool:
        st = self.server.app[GATEWAY]
        return adapter in st.view.adapters and st.table.with_adapter(adapter) == instances


@pytest.fixture
async def gw() -> AsyncIterator[Gw]:
    async for (a, b) in engines("a", "b"):
        store = MemoryStore()
        for spec in (BASE, PLAIN):
            await store.put(keys.model_key(spec.name), dumps(spec.to_dict()))
        server = GatewayServer(build_gateway_app(GatewayConfig(no_replica_wait_s=0), store, CollectorRegistry()))
        await server.start_server()
        g = Gw(store, server, aiohttp.ClientSession(), a, b)
        await g.replica("base", a, adapters=("tone",))
        await g.replica("base:1", b)
        await g.adapter("tone")
        await until(g.synced)
        try:
            yield g
        finally:
            await g.http.close()
            await server.close()


def chat(model: str, text: str = "hi") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 3}


# --- routing ---------------------------------------------------------------------------------------------

async def test_an_adapters_requests_go_only_to_replicas_that_have_it_with_the_body_unchanged(gw: Gw) -> None:
    for i in range(6):
        status, headers, body = await gw.call("POST", "/v1/chat/completions", chat("tone", f"hi {i}"))
        assert status == 200 and headers["X-Engine"] == "a", body
    assert gw.b.received == []
    assert [json.loads(r.body)["model"] for r in gw.a.received] == ["tone"] * 6  # vLLM takes the adapter by name
    # The base model itself still goes to both.
    # The base model itself still goes to both (different prompts: each prompt prefix has a home replica).
    seen = {(await gw.call("POST", "/v1/chat/completions", chat("base", f"hi {i}")))[1]["X-Engine"]
            for i in range(16)}
    assert seen == {"a", "b"}
    # Loaded on the second replica too: both serve it.
    await gw.replica("base:1", gw.b, adapters=("tone",))
    await until(lambda: gw.state_has("tone", {"base", "base:1"}))
    seen = {(await gw.call("POST", "/v1/chat/completions", chat("tone", f"hi {i}")))[1]["X-Engine"]
            for i in range(16)}
    assert seen == {"a", "b"}


async def test_an_adapter_loaded_nowhere_yet_is_503_and_an_unknown_one_404(gw: Gw) -> None:
    await gw.adapter("cold")
    await until(lambda: "cold" in gw.server.app[GATEWAY].view.adapters)
    status, headers, body = await gw.call("POST", "/v1/chat/completions", chat("cold"))
    assert status == 503 and body["error"]["code"] == "model_not_ready" and headers["Retry-After"]
    assert "cold" in body["error"]["message"] and "base" in body["error"]["message"]
    status, _, body = await gw.call("POST", "/v1/chat/completions", chat("nope"))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    # An adapter whose base was unloaded is unknown, not a 500.
    await gw.store.delete(keys.model_key("base"))
    await until(lambda: "base" not in gw.server.app[GATEWAY].view.models)
    assert (await gw.call("POST", "/v1/chat/completions", chat("tone")))[0] == 404
    assert "tone" not in {m["id"] for m in (await gw.call("GET", "/v1/models"))[2]["data"]}


async def test_v1_models_lists_adapters_with_their_parent(gw: Gw) -> None:
    status, _, listing = await gw.call("GET", "/v1/models")
    entries = {m["id"]: m for m in listing["data"]}
    assert status == 200 and set(entries) == {"base", "plain", "tone"}
    assert entries["tone"] | {"created": 0} == {"id": "tone", "object": "model", "created": 0, "owned_by": "nebula",
                                                "root": "/adapters/x", "parent": "base", "task": "generate",
                                                "ready": 1}
    assert "parent" not in entries["base"]
    status, _, one = await gw.call("GET", "/v1/models/tone")
    assert status == 200 and one == entries["tone"]


async def test_a_key_limited_to_models_sees_an_adapter_only_when_it_names_it(gw: Gw) -> None:
    async def key(key_id: str, token: str, models: list[str]) -> None:
        record = KeyRequest.from_dict({"name": key_id, "models": models}).record(key_id, digest(token), 1.0)
        await gw.store.put(keys.apikey_key(key_id), dumps(record.to_dict()))

    await key("00000000000000aa", "t-base", ["base"])
    await key("00000000000000bb", "t-tone", ["tone"])
    # The base's key does not get the base's adapters with it (waits until this gateway mirrored both keys).
    await until_models(gw, "t-base", {"base"})
    await until_models(gw, "t-tone", {"tone"})
    status, _, body = await gw.call("POST", "/v1/chat/completions", chat("tone"), key="t-base")
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    assert (await gw.call("GET", "/v1/models/tone", key="t-base"))[0] == 404
    # The adapter's key uses it by name (on the base's replicas), and nothing else.
    status, headers, _ = await gw.call("POST", "/v1/chat/completions", chat("tone"), key="t-tone")
    assert status == 200 and headers["X-Engine"] == "a"
    assert (await gw.call("POST", "/v1/chat/completions", chat("base"), key="t-tone"))[0] == 403


async def until_models(gw: Gw, token: str, ids: set[str]) -> None:
    async def listed() -> bool:
        status, _, body = await gw.call("GET", "/v1/models", key=token)
        return status == 200 and {m["id"] for m in body["data"]} == ids

    await until(listed)


# --- the admin API ---------------------------------------------------------------------------------------

def adapter_dir(tmp_path: Path, rank: int) -> str:
    d = tmp_path / f"lora-r{rank}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank,
                                                       "target_modules": ["q_proj", "v_proj"]}))
    return str(d)


async def test_adding_an_adapter_checks_its_base_rank_and_name(gw: Gw, tmp_path: Path) -> None:
    small, big = adapter_dir(tmp_path, 4), adapter_dir(tmp_path, 16)
    status, _, body = await gw.call("POST", "/v1/admin/adapters", {"name": "sql", "base": "base", "source": small})
    assert status == 201 and body == {"created": True, "adapter": {"name": "sql", "base": "base", "source": small,
                                                                    "rank": 4}}
    # The same again is a no-op; another source under the name is a conflict.
    status, _, body = await gw.call("POST", "/v1/admin/adapters", {"name": "sql", "base": "base", "source": small})
    assert status == 200 and body["created"] is False
    status, _, body = await gw.call("POST", "/v1/admin/adapters", {"name": "sql", "base": "base", "source": "/x"})
    assert status == 409 and body["error"]["code"] == "adapter_exists"

    refusals = [
        ({"name": "x", "base": "ghost", "source": small}, 404, "ghost"),
        ({"name": "x", "base": "plain", "source": small}, 400, "--enable-lora"),
        ({"name": "x", "base": "base", "source": big}, 400, "--max-lora-rank=16"),
        ({"name": "x", "base": "base", "source": "org/x-lora", "rank": 32}, 400, "rank 32"),
        ({"name": "plain", "base": "base", "source": small}, 409, "loaded model's name"),
        ({"name": "x", "base": "base", "source": "relative/dir/x"}, 400, ""),
        ({"name": "x", "base": "base"}, 400, "source"),
    ]
    for request, code, words in refusals:
        status, _, body = await gw.call("POST", "/v1/admin/adapters", request)
        assert status == code and words in body["error"]["message"], (request, body)
    assert {kv.key for kv in (await gw.store.list_prefix(keys.ADAPTERS)).items} == {keys.adapter_key("sql"),
                                                                                   keys.adapter_key("tone")}


async def test_the_adapter_list_says_where_each_is_loaded_and_what_the_engines_refused(gw: Gw) -> None:
    await gw.adapter("big")
    await gw.replica("base:1", gw.b, errors=(("big", "LoRA rank 16 is greater than max_lora_rank 8."),))
    status, _, body = await gw.call("GET", "/v1/admin/adapters")
    assert status == 200
    listed = {a["name"]: a for a in body["data"]}
    assert listed["tone"]["loaded_on"] == ["base"] and listed["tone"]["replicas"] == 2
    assert listed["tone"]["errors"] == {}
    assert listed["big"]["loaded_on"] == [] and listed["big"]["errors"] == {
        "base:1": "LoRA rank 16 is greater than max_lora_rank 8."}
    status, _, body = await gw.call("DELETE", "/v1/admin/adapters/big")
    assert status == 200 and body == {"name": "big", "deleted": True}
    status, _, body = await gw.call("DELETE", "/v1/admin/adapters/big")
    assert status == 404 and body["error"]["code"] == "adapter_not_found"


async def test_a_model_cannot_take_an_adapters_name() -> None:
    store = MemoryStore()
    writes = ClusterWrites(store)
    await store.put(keys.model_key("base"), dumps(BASE.to_dict()))
    base_kv = await store.get(keys.model_key("base"))
    assert base_kv is not None
    assert await writes.add_adapter(AdapterSpec("tone", "base", "/a"), base_kv.mod_revision)
    with pytest.raises(Refused, match="nebula adapter rm tone"):
        await writes.load_model(ModelSpec(name="tone", source="org/tone"))
    assert await store.get(keys.model_key("tone")) is None


async def test_a_base_with_adapters_is_not_unloaded_until_they_are_removed(gw: Gw) -> None:
    await gw.adapter("tone")
    status, _, body = await gw.call("DELETE", "/v1/admin/models/base")
    assert status == 409 and body["error"]["code"] == "model_has_adapters", body
    assert "nebula adapter rm tone" in body["error"]["message"]
    assert await gw.store.get(keys.model_key("base")) is not None
    await gw.store.put(keys.adapter_key("junk"), b"{not json")  # a damaged record does not block an unload
    status, _, _ = await gw.call("DELETE", "/v1/admin/adapters/tone")
    assert status == 200
    status, _, body = await gw.call("DELETE", "/v1/admin/models/base")
    assert status == 200 and body == {"name": "base", "deleted": True}
