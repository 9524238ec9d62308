"""The gateway over loopback: validation, errors, admin API, keys, and the full path
client -> gateway -> fake engine (with the real `openai` client too). Forwarding itself (picks, retries,
load, affinity) is test_gateway_forward's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.sdnotify import Notifier
from nebula.core import keys
from nebula.core.config import GatewayConfig, NebulaConfig
from nebula.core.model import Gpu, ModelSpec, NodeRecord, Phase, Task, dumps, loads
from nebula.core.store import Guard, Op
from nebula.services.gateway.app import build_gateway_app, serve_gateway
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, completion_bytes, engines, put_instance, sse_chunks, until

ADMIN_KEY, USER_KEY = "admin-secret", "user-secret"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


MODELS = [ModelSpec(name="m", source="org/m"), ModelSpec(name="e", source="org/e", task=Task.EMBED),
          ModelSpec(name="r", source="org/r", task=Task.RERANK)]


@dataclass
class Stack:
    store: MemoryStore
    registry: CollectorRegistry
    gateway: GatewayServer
    http: aiohttp.ClientSession
    engine: FakeEngine

    def url(self, path: str) -> str:
        return str(self.gateway.make_url(path))

    async def call(self, method: str, path: str, body: object = None, key: str | None = None,
                   raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.http.request(method, self.url(path), data=data, headers=headers) as resp:
            text = await resp.read()
            return resp.status, dict(resp.headers), json.loads(text) if text else None


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async for started in engines("a"):
        yield started[0]


@pytest.fixture
async def make_stack(engine: FakeEngine) -> AsyncIterator[MakeStack]:
    made: list[Stack] = []

    async def make(**cfg: Any) -> Stack:
        store = MemoryStore()
        for spec in MODELS:
            await store.put(keys.model_key(spec.name), dumps(spec.to_dict()))
        await put_instance(store, "m", engine.endpoint)
        await put_instance(store, "m:1", "http://127.0.0.1:1", Phase.STARTING)
        await put_instance(store, "e", engine.endpoint, model="e", task=Task.EMBED)
        registry = CollectorRegistry()
        gateway = GatewayServer(build_gateway_app(GatewayConfig(**cfg), store, registry))
        await gateway.start_server()
        stack = Stack(store, registry, gateway, aiohttp.ClientSession(), engine)
        made.append(stack)
        await until(lambda: len(gateway.app[GATEWAY].view.models) == len(MODELS)
                    and bool(gateway.app[GATEWAY].table.ready().get("m")))
        return stack

    yield make
    for s in made:
        await s.http.close()
        await s.gateway.close()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

INVALID = [
    ("chat/completions", b"{not json", None),
    ("chat/completions", b"[1, 2]", None),
    ("chat/completions", b"", None),
    ("chat/completions", json.dumps({"messages": CHAT["messages"]}).encode(), "model"),
    ("chat/completions", json.dumps({**CHAT, "model": 7}).encode(), "model"),
    ("chat/completions", json.dumps({**CHAT, "model": ""}).encode(), "model"),
    ("chat/completions", json.dumps({"model": "m"}).encode(), "messages"),
    ("chat/completions", json.dumps({"model": "m", "messages": "hi"}).encode(), "messages"),
    ("chat/completions", json.dumps({"model": "m", "messages": []}).encode(), "messages"),
    ("chat/completions", json.dumps({"model": "m", "messages": [{"content": "x"}]}).encode(),
     "messages[0].role"),
    ("chat/completions", json.dumps({**CHAT, "max_tokens": -1}).encode(), "max_tokens"),
    ("chat/completions", json.dumps({**CHAT, "max_tokens": True}).encode(), "max_tokens"),
    ("chat/completions", json.dumps({**CHAT, "stream": "yes"}).encode(), "stream"),
    ("chat/completions", json.dumps({**CHAT, "temperature": "hot"}).encode(), "temperature"),
    ("chat/completions", json.dumps({**CHAT, "top_p": 0}).encode(), "top_p"),
    ("chat/completions", json.dumps({**CHAT, "stop": [1]}).encode(), "stop"),
    ("completions", json.dumps({"model": "m"}).encode(), "prompt"),
    ("completions", json.dumps({"model": "m", "prompt": []}).encode(), "prompt"),
    ("completions", json.dumps({"model": "m", "prompt": [{"a": 1}]}).encode(), "prompt"),
    ("embeddings", json.dumps({"model": "e"}).encode(), "input"),
    ("embeddings", json.dumps({"model": "e", "input": "x", "encoding_format": "hex"}).encode(),
     "encoding_format"),
    ("rerank", json.dumps({"model": "r", "documents": ["d"]}).encode(), "query"),
    ("rerank", json.dumps({"model": "r", "query": "q"}).encode(), "documents"),
    ("rerank", json.dumps({"model": "r", "query": "q", "documents": []}).encode(), "documents"),
    ("score", json.dumps({"model": "r", "text_1": "q"}).encode(), "text_2"),
]


def assert_openai_error(body: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                           404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
                           413: "invalid_request_error", 503: "server_error"}[status]
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(("path", "raw", "param"), INVALID)
async def test_invalid_requests_get_400_in_openai_shape(make_stack: MakeStack, path: str, raw: bytes,
                                                        param: str | None) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", f"/v1/{path}", raw=raw)
    assert status == 400
    err = assert_openai_error(body, 400)
    assert err["param"] == param
    assert s.engine.received == []


async def test_oversized_body_is_413(make_stack: MakeStack) -> None:
    s = await make_stack(max_body_bytes=1024)
    status, _, body = await s.call("POST", "/v1/chat/completions", {**CHAT, "pad": "x" * 4096})
    assert status == 413
    assert_openai_error(body, 413, "request_too_large")


async def test_a_client_still_sending_a_too_big_body_reads_the_413(make_stack: MakeStack) -> None:
    # urllib-style: the whole body is written before the answer is read. Closing at once with the body
    # unread would make the kernel reset the connection, and the client would see a reset, not the 413.
    s = await make_stack(max_body_bytes=1024)
    body = b'{"pad": "' + b"x" * (4 << 20) + b'"}'

    def post() -> tuple[int, bytes]:
        request = urllib.request.Request(s.url("/v1/chat/completions"), data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    status, answer = await asyncio.to_thread(post)
    assert status == 413
    assert_openai_error(json.loads(answer), 413, "request_too_large")


async def test_unknown_model_is_404_model_not_found(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", "/v1/chat/completions", {**CHAT, "model": "nope"})
    assert status == 404
    assert assert_openai_error(body, 404, "model_not_found")["param"] == "model"
    labels = {"model": "unknown", "endpoint": "chat/completions", "status": "404"}
    assert s.registry.get_sample_value("nebula_gateway_requests_total", labels) == 1


@pytest.mark.parametrize(("path", "body"), [
    ("chat/completions", {**CHAT, "model": "e"}),
    ("embeddings", {"model": "m", "input": "x"}),
    ("rerank", {"model": "e", "query": "q", "documents": ["d"]}),
])
async def test_model_of_the_wrong_task_is_400(make_stack: MakeStack, path: str, body: dict[str, Any]) -> None:
    s = await make_stack()
    status, _, got = await s.call("POST", f"/v1/{path}", body)
    assert status == 400
    assert assert_openai_error(got, 400, "model_not_supported")["param"] == "model"


async def test_unknown_path_and_wrong_method_keep_the_openai_shape(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", "/v1/nothing-here", CHAT)
    assert status == 404
    assert_openai_error(body, 404, "not_found")
    status, _, body = await s.call("GET", "/v1/chat/completions")
    assert status == 405
    assert_openai_error(body, 405, "method_not_allowed")


async def test_ready_model_with_unreachable_engines_is_503(make_stack: MakeStack) -> None:
    s = await make_stack()
    await put_instance(s.store, "e", "http://127.0.0.1:1", model="e", task=Task.EMBED)
    await until(lambda: s.gateway.app[GATEWAY].table.ready()["e"][0].endpoint == "http://127.0.0.1:1")
    status, headers, body = await s.call("POST", "/v1/embeddings", {"model": "e", "input": "x"})
    assert status == 503 and headers["Retry-After"]
    assert_openai_error(body, 503, "service_unavailable")


async def test_model_with_no_ready_replica_is_503(make_stack: MakeStack) -> None:
    s = await make_stack()
    rerank = {"model": "r", "query": "q", "documents": ["d"]}
    status, headers, body = await s.call("POST", "/v1/rerank", rerank)
    assert status == 503 and headers["Retry-After"] == "1"
    assert_openai_error(body, 503, "model_not_ready")


async def test_original_bytes_reach_the_engine_and_come_back_exact(make_stack: MakeStack) -> None:
    s = await make_stack()
    # Odd spacing and an unknown field: the gateway must forward the client's bytes, not a re-encoding.
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}], "x_custom": {"k": [1,2]}}'
    async with s.http.post(s.url("/v1/chat/completions"), data=raw,
                           headers={"Authorization": "Bearer whatever",
                                    "Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert await resp.read() == completion_bytes("a", "m")
    got = s.engine.received[-1]
    assert got.body == raw
    assert "Authorization" not in got.headers
    assert s.registry.get_sample_value("nebula_gateway_requests_total",
                                       {"model": "m", "endpoint": "chat/completions", "status": "200"}) == 1
    assert s.registry.get_sample_value("nebula_gateway_request_duration_seconds_count",
                                       {"model": "m", "endpoint": "chat/completions"}) == 1
    assert s.registry.get_sample_value("nebula_gateway_inflight_requests",
                                       {"endpoint": "chat/completions"}) == 0


async def test_sse_through_the_gateway_is_byte_exact(make_stack: MakeStack) -> None:
    s = await make_stack()
    async with s.http.post(s.url("/v1/chat/completions"), json={**CHAT, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert await resp.read() == b"".join(sse_chunks("a", "m"))


async def test_openai_client_chat_and_stream(make_stack: MakeStack) -> None:
    s = await make_stack(api_key_hashes=(sha(USER_KEY),))
    client = openai.AsyncOpenAI(base_url=s.url("/v1"), api_key=USER_KEY, max_retries=0)
    try:
        done = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content == "hello from a"
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "hello from a"
        models = await client.models.list()
        assert sorted(m.id for m in models.data) == ["e", "m", "r"]
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found"
        bad = openai.AsyncOpenAI(base_url=s.url("/v1"), api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await bad.close()
    finally:
        await client.close()


async def test_models_list_has_task_replicas_and_phases(make_stack: MakeStack) -> None:
    s = await make_stack()
    await until(lambda: s.gateway.app[GATEWAY].table.phases()["m"].get(Phase.STARTING) == 1)
    status, _, body = await s.call("GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["m"] == {"id": "m", "object": "model", "created": 0, "owned_by": "nebula",
                          "task": "generate", "replicas": 1, "ready": 1,
                          "phases": {"ready": 1, "starting": 1}}
    assert by_id["r"]["ready"] == 0 and by_id["r"]["phases"] == {}
    status, _, one = await s.call("GET", "/v1/models/e")
    assert status == 200 and one["task"] == "embed"
    status, _, _ = await s.call("GET", "/v1/models/nope")
    assert status == 404


# --- admin API ---------------------------------------------------------------------------------------------

NEW = {"name": "q", "source": "Qwen/Qwen2.5-0.5B-Instruct", "replicas": 2}


async def stored_spec(store: MemoryStore, name: str) -> ModelSpec | None:
    kv = await store.get(keys.model_key(name))
    return ModelSpec.from_dict(loads(kv.value)) if kv else None


async def test_load_is_idempotent_and_conflicts_on_a_different_spec(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", "/v1/admin/models", NEW)
    assert status == 200 and body["created"] is True
    assert await stored_spec(s.store, "q") == ModelSpec.from_dict(NEW)
    status, _, body = await s.call("POST", "/v1/admin/models", NEW)
    assert status == 200 and body["created"] is False
    status, _, body = await s.call("POST", "/v1/models/load", {**NEW, "source": "other/repo"})
    assert status == 409
    assert_openai_error(body, 409, "model_exists")
    assert await stored_spec(s.store, "q") == ModelSpec.from_dict(NEW)


async def test_load_alias_creates(make_stack: MakeStack) -> None:
    s = await make_stack()
    spec = {"name": "z", "source": "org/z", "task": "embed"}
    status, _, body = await s.call("POST", "/v1/models/load", spec)
    assert status == 200 and body["created"] is True
    await until(lambda: "z" in s.gateway.app[GATEWAY].view.models)


@pytest.mark.parametrize(("spec", "param"), [
    ({**NEW, "replicas": 0}, "replicas"),
    ({**NEW, "name": "Bad Name"}, "name"),
    ({"name": "q"}, "source"),
    ({**NEW, "task": "dance"}, "task"),
    ({**NEW, "engine_args": "--x"}, "engine_args"),
])
async def test_load_invalid_spec_is_400_naming_the_field(make_stack: MakeStack, spec: dict[str, Any],
                                                         param: str) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", "/v1/admin/models", spec)
    assert status == 400
    assert assert_openai_error(body, 400)["param"] == param
    assert await stored_spec(s.store, "q") is None


async def test_load_asking_for_more_gpus_than_any_node_has_is_400(make_stack: MakeStack) -> None:
    s = await make_stack()
    eight = {**NEW, "gpus_per_replica": 8}
    # No node yet: nodes may still join, so the load is taken (and stays pending until one fits).
    assert (await s.call("POST", "/v1/admin/models", {**eight, "name": "early"}))[0] == 200
    gpus = [Gpu(index=i, name="L4", memory_total_mib=23034, memory_used_mib=0) for i in range(4)]
    await s.store.put(keys.node_key("n1"), dumps(NodeRecord(name="n1", address="10.0.0.1", port_min=18000,
                                                            port_max=18100, gpus=tuple(gpus)).to_dict()))
    status, _, body = await s.call("POST", "/v1/admin/models", eight)
    assert status == 400
    err = assert_openai_error(body, 400, "insufficient_gpus")
    assert err["param"] == "gpus_per_replica" and "the most on one node is 4 (n1)" in err["message"]
    assert await stored_spec(s.store, "q") is None
    # Memory beyond every GPU is not refused: it stays pending with the scheduler's reason.
    assert (await s.call("POST", "/v1/admin/models", {**NEW, "gpus_per_replica": 4, "gpu_memory_mib": 40960}))[0] == 200


async def test_unload_then_404(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("DELETE", "/v1/admin/models/r")
    assert status == 200 and body == {"name": "r", "deleted": True}
    assert await stored_spec(s.store, "r") is None
    status, _, body = await s.call("DELETE", "/v1/admin/models/r")
    assert status == 404
    assert_openai_error(body, 404, "model_not_found")
    await until(lambda: "r" not in s.gateway.app[GATEWAY].view.models)
    status, _, _ = await s.call("POST", "/v1/rerank", {"model": "r", "query": "q", "documents": ["d"]})
    assert status == 404


async def test_scale_with_patch(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("PATCH", "/v1/admin/models/m", {"replicas": 3})
    assert status == 200 and body["model"]["replicas"] == 3
    spec = await stored_spec(s.store, "m")
    assert spec is not None and spec.replicas == 3 and spec.source == "org/m"
    status, _, body = await s.call("PATCH", "/v1/admin/models/m", {"replicas": 0})
    assert status == 400 and body["error"]["param"] == "replicas"
    status, _, body = await s.call("PATCH", "/v1/admin/models/m", {"replicas": 2, "source": "x/y"})
    assert status == 400
    status, _, body = await s.call("PATCH", "/v1/admin/models/nope", {"replicas": 2})
    assert status == 404


async def test_scale_retries_on_a_concurrent_write(make_stack: MakeStack) -> None:
    s = await make_stack()
    real_commit = s.store.commit
    calls = 0

    async def racing_commit(guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:  # another admin writes in between our read and our write
            await s.store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="org/m",
                                                                   labels={"x": "y"}).to_dict()))
        return await real_commit(guards, ops)

    s.store.commit = racing_commit  # type: ignore[method-assign]
    status, _, _ = await s.call("PATCH", "/v1/admin/models/m", {"replicas": 4})
    assert status == 200 and calls == 2
    spec = await stored_spec(s.store, "m")
    assert spec is not None and spec.replicas == 4 and spec.labels == {"x": "y"}


async def test_admin_lists_models_with_instances_and_nodes(make_stack: MakeStack) -> None:
    s = await make_stack()
    node = NodeRecord(name="n1", address="10.0.0.1", port_min=20000, port_max=20100)
    await s.store.put(keys.node_key("n1"), dumps(node.to_dict()))
    await s.store.put(keys.node_key("junk"), b"not json")
    status, _, body = await s.call("GET", "/v1/admin/models")
    assert status == 200
    m = next(x for x in body["data"] if x["name"] == "m")
    assert m["spec"]["source"] == "org/m" and m["ready"] == 1
    assert [(i["instance"], i["phase"]) for i in m["instances"]] == [("m", "ready"), ("m:1", "starting")]
    assert m["instances"][1]["message"] == "loading" and m["instances"][0]["node"] == "n1"
    status, _, one = await s.call("GET", "/v1/admin/models/m")
    assert status == 200 and one == m
    status, _, _ = await s.call("GET", "/v1/admin/models/nope")
    assert status == 404
    status, _, nodes = await s.call("GET", "/v1/admin/nodes")
    assert status == 200 and nodes["data"] == [node.to_dict()]


async def test_store_outage_is_503_not_500(make_stack: MakeStack) -> None:
    s = await make_stack()
    s.store.set_reachable(False)
    try:
        status, headers, body = await s.call("GET", "/v1/admin/models")
        assert status == 503 and headers["Retry-After"]
        assert_openai_error(body, 503)
        # Inference keeps working from the gateway's last view.
        status, _, _ = await s.call("POST", "/v1/chat/completions", CHAT)
        assert status == 200
    finally:
        s.store.set_reachable(True)


# --- keys --------------------------------------------------------------------------------------------------

async def test_keys_scope_admin_and_inference(make_stack: MakeStack) -> None:
    s = await make_stack(admin_key_hashes=(sha(ADMIN_KEY),), api_key_hashes=(sha(USER_KEY),))
    cases = [
        ("GET", "/v1/models", None, 401), ("GET", "/v1/models", "wrong", 401),
        ("GET", "/v1/models", USER_KEY, 200), ("GET", "/v1/models", ADMIN_KEY, 200),
        ("POST", "/v1/chat/completions", None, 401), ("POST", "/v1/chat/completions", USER_KEY, 200),
        ("GET", "/v1/admin/models", None, 401), ("GET", "/v1/admin/models", USER_KEY, 403),
        ("GET", "/v1/admin/models", "wrong", 401), ("GET", "/v1/admin/models", ADMIN_KEY, 200),
        ("POST", "/v1/models/load", USER_KEY, 403), ("DELETE", "/v1/admin/models/m", USER_KEY, 403),
        ("GET", "/healthz", None, 200), ("GET", "/metrics", None, 200),
    ]
    for method, path, key, want in cases:
        body = CHAT if path == "/v1/chat/completions" else (NEW if path == "/v1/models/load" else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with s.http.request(method, s.url(path), json=body, headers=headers) as resp:
            assert resp.status == want, (method, path, key)
            if want in (401, 403):
                assert_openai_error(await resp.json(), want)
    assert await stored_spec(s.store, "m") is not None  # the refused DELETE did nothing


async def test_once_any_key_exists_nothing_is_open(make_stack: MakeStack) -> None:
    s = await make_stack(api_key_hashes=(sha(USER_KEY),))
    status, _, _ = await s.call("GET", "/v1/admin/models")
    assert status == 401
    status, _, _ = await s.call("GET", "/v1/admin/models", key=USER_KEY)
    assert status == 403
    status, _, _ = await s.call("GET", "/v1/models")
    assert status == 401


async def test_healthz_and_metrics(make_stack: MakeStack) -> None:
    s = await make_stack()
    await s.call("POST", "/v1/chat/completions", CHAT)
    status, _, body = await s.call("GET", "/healthz")
    assert status == 200 and body["models_synced"] is True and body["models"] == 3
    async with s.http.get(s.url("/metrics")) as resp:
        text = await resp.text()
    assert 'nebula_gateway_requests_total{endpoint="chat/completions",model="m",status="200"} 1.0' in text


async def test_client_disconnect_cancels_the_engine_request(make_stack: MakeStack) -> None:
    s = await make_stack()
    s.engine.hold = asyncio.Event()
    request = asyncio.create_task(s.http.post(s.url("/v1/chat/completions"), json=CHAT).__aenter__())
    await asyncio.wait_for(s.engine.held.wait(), 5.0)
    request.cancel()
    await asyncio.wait_for(s.engine.cancelled.wait(), 5.0)
    gone = {"model": "m", "endpoint": "chat/completions", "status": "499"}
    await until(lambda: s.registry.get_sample_value("nebula_gateway_requests_total", gone) == 1)


async def test_serve_gateway_listens_and_notifies_ready(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock, socket.socket() as probe:
        notify_sock.bind(str(tmp_path / "notify"))
        notify_sock.setblocking(False)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        cfg = NebulaConfig(gateway=GatewayConfig(port=port))
        serving = asyncio.create_task(serve_gateway(cfg, MemoryStore(), CollectorRegistry(), notifier))
        try:
            assert (await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 5.0)).startswith(b"READY=1")
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            notifier.close()


async def test_gateway_started_without_the_store_answers_503_not_404() -> None:
    store = MemoryStore()
    store.set_reachable(False)
    # A key from the config passes while the stored keys are unknown (without it: 503 keys_not_loaded).
    gateway = GatewayServer(build_gateway_app(GatewayConfig(api_key_hashes=(sha(USER_KEY),)), store,
                                           CollectorRegistry()))
    await gateway.start_server()
    try:
        async with aiohttp.ClientSession() as http, http.post(gateway.make_url("/v1/chat/completions"), json=CHAT,
                                                              headers={"Authorization": f"Bearer {USER_KEY}"}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert_openai_error(await resp.json(), 503, "models_not_loaded")
    finally:
        await gateway.close()


async def test_a_conversation_stays_on_one_replica_through_the_gateway() -> None:
    """The gateway keys each request on its prompt prefix and keeps a conversation on one replica's cache."""
    async for (a, b) in engines("a", "b"):
        await _check_affinity(a, b)


async def _check_affinity(a: FakeEngine, b: FakeEngine) -> None:
    store = MemoryStore()
    for spec in MODELS:
        await store.put(keys.model_key(spec.name), dumps(spec.to_dict()))
    await put_instance(store, "m", a.endpoint)
    await put_instance(store, "m:1", b.endpoint)
    gateway = GatewayServer(build_gateway_app(GatewayConfig(load_poll_s=0), store, CollectorRegistry()))
    await gateway.start_server()
    try:
        await until(lambda: len(gateway.app[GATEWAY].table.ready().get("m", [])) == 2
                    and "m" in gateway.app[GATEWAY].view.models)
        async with aiohttp.ClientSession() as http:
            async def chat(system: str, turn: str) -> None:
                body = {"model": "m", "messages": [{"role": "system", "content": system},
                                                   {"role": "user", "content": "first question"},
                                                   {"role": "assistant", "content": "answer"},
                                                   {"role": "user", "content": turn}]}
                async with http.post(gateway.make_url("/v1/chat/completions"), json=body) as resp:
                    assert resp.status == 200

            for i in range(6):
                await chat("you are helpful", f"turn {i}")
            assert sorted([len(a.received), len(b.received)]) == [0, 6], "a conversation was split"
            for i in range(12):
                await chat(f"persona {i}", "hello")
            assert len(a.received) > 0 and len(b.received) > 0, "distinct conversations were not spread"
    finally:
        await gateway.close()
