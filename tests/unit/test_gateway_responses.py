"""The Responses API and the tokenizer through the gateway (both of its servers), against two small engines
that keep stored responses as vLLM does: in their own memory, under the body's request_id.

What is proved: a new response's id names the replica that made it (also after a retry on another one), every
follow-up (GET, cancel, previous_response_id) reaches that replica, a gone or restarted replica and a made-up
id get a clear 404 in OpenAI's shape, and the client's body reaches the engine byte for byte but for the id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.model import InstanceStatus, ModelSpec, Phase, Task, dumps
from nebula.core.response_ids import replica_token, token_of
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.auth import Scope, scope_of
from nebula.services.gateway.responses_api import stored_request
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.harness.ports import free_port
from tests.unit.fake_engine import until

ADMIN = "admin-secret"
GONE = "resp_" + "0" * 16 + "_" + "1" * 32


def not_found(rid: str) -> web.Response:
    return web.json_response({"error": {"message": f"Response with id '{rid}' not found.",
                                        "type": "invalid_request_error", "param": "response_id", "code": 404}},
                             status=404)


@dataclass
class StoreEngine:
    """vLLM's Responses store, reduced: POST keeps the response under its request_id, GET and cancel read it."""

    name: str
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)  # method, path and query, body
    endpoint: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/responses", self.create)
        app.router.add_get("/v1/responses/{id}", self.retrieve)
        app.router.add_post("/v1/responses/{id}/cancel", self.cancel)
        app.router.add_post("/tokenize", self.tokenize)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _seen(self, request: web.Request) -> bytes:
        body = await request.read()
        self.seen.append((request.method, request.path_qs, body))
        return body

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await self._seen(request))
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            return not_found(previous)
        response = {"id": body["request_id"], "object": "response", "status": "completed", "engine": self.name,
                    "previous_response_id": previous, "output": []}
        self.stored[response["id"]] = response
        if not body.get("stream"):
            return web.json_response(response)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for kind in ("response.created", "response.completed"):
            await resp.write(f"event: {kind}\ndata: {json.dumps({'type': kind, 'response': response})}\n\n".encode())
        await resp.write_eof()
        return resp

    async def retrieve(self, request: web.Request) -> web.Response:
        await self._seen(request)
        rid = request.match_info["id"]
        return web.json_response(self.stored[rid]) if rid in self.stored else not_found(rid)

    async def cancel(self, request: web.Request) -> web.Response:
        await self._seen(request)
        rid = request.match_info["id"]
        if rid not in self.stored:
            return not_found(rid)
        return web.json_response({"error": {"message": "Cannot cancel a synchronous response.", "code": 400,
                                            "type": "invalid_request_error", "param": "response_id"}}, status=400)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = json.loads(await self._seen(request))
        return web.json_response({"tokens": [ord(c) for c in body["prompt"]], "engine": self.name})


@dataclass
class Gw:
    store: MemoryStore
    server: GatewayServer
    http: aiohttp.ClientSession
    engines: dict[str, StoreEngine]  # by instance

    async def call(self, method: str, path: str, body: Any = None, key: str = ADMIN,
                   raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.http.request(method, str(self.server.make_url(path)), data=data,
                                     headers={"Authorization": f"Bearer {key}"}) as resp:
            text = await resp.read()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def put(self, instance: str, endpoint: str, restarts: int = 0, phase: Phase = Phase.READY,
                  model: str = "m", task: Task = Task.GENERATE) -> None:
        st = InstanceStatus(instance=instance, model=model, node="n1", phase=phase, endpoint=endpoint, task=task,
                            restarts=restarts)
        await self.store.put(keys.instance_key(instance), dumps(st.to_dict()))

    def holder(self, rid: str) -> str:
        """The instance whose engine stores `rid`."""
        (instance,) = [i for i, e in self.engines.items() if rid in e.stored]
        return instance


def token(instance: str, endpoint: str, restarts: int = 0) -> str:
    return replica_token(instance, "n1", endpoint, restarts)


@pytest.fixture
async def gw() -> AsyncIterator[Gw]:
    engines = {"m": StoreEngine("a"), "m:1": StoreEngine("b")}
    for e in engines.values():
        await e.start()
    store = MemoryStore()
    for spec in (ModelSpec(name="m", source="org/m", replicas=2), ModelSpec(name="e", source="org/e", task=Task.EMBED)):
        await store.put(keys.model_key(spec.name), dumps(spec.to_dict()))
    cfg = GatewayConfig(admin_key_hashes=(hashlib.sha256(ADMIN.encode()).hexdigest(),), load_poll_s=0)
    server = GatewayServer(build_gateway_app(cfg, store, CollectorRegistry()))
    await server.start_server()
    g = Gw(store, server, aiohttp.ClientSession(), engines)
    for instance, e in engines.items():
        await g.put(instance, e.endpoint)
    await g.put("e", engines["m"].endpoint, model="e", task=Task.EMBED)
    await until(lambda: len(server.app[GATEWAY].table.ready().get("m", ())) == 2)
    yield g
    await g.http.close()
    await server.close()
    for e in engines.values():
        assert e.runner is not None
        await e.runner.cleanup()


async def test_a_response_is_named_for_its_replica_and_followed_there(gw: Gw) -> None:
    firsts = []
    # Distinct first inputs: prefix affinity homes each conversation by its own key, so they spread over both
    # replicas (all of 32 on one: a 1 in 2^31 chance), while one input always goes to one replica.
    for i in range(32):
        status, first = await gw.call("POST", "/v1/responses", {"model": "m", "input": f"story {i}"})
        assert status == 200, first
        home = gw.holder(first["id"])
        assert token_of(first["id"]) == token(home, gw.engines[home].endpoint)
        firsts.append(first["id"])
        if i >= 3 and all(e.stored for e in gw.engines.values()):
            break
    assert all(e.stored for e in gw.engines.values())
    again = [await gw.call("POST", "/v1/responses", {"model": "m", "input": "story 0"}) for _ in range(3)]
    assert {gw.holder(answer["id"]) for _, answer in again} == {gw.holder(firsts[0])}
    for rid in firsts:
        home = gw.holder(rid)
        for _ in range(3):  # a conversation: each turn continues the last, on the replica that holds it
            status, turn = await gw.call("POST", "/v1/responses", {"model": "m", "input": "more",
                                                                   "previous_response_id": rid})
            assert status == 200, turn
            assert gw.holder(turn["id"]) == home and turn["previous_response_id"] == rid
            rid = turn["id"]
        status, got = await gw.call("GET", f"/v1/responses/{rid}")
        assert status == 200 and got["id"] == rid and got["engine"] == gw.engines[home].name
        status, cancelled = await gw.call("POST", f"/v1/responses/{rid}/cancel")
        assert status == 400 and cancelled["error"]["message"] == "Cannot cancel a synchronous response."


async def test_the_client_s_bytes_reach_the_engine_but_for_the_id(gw: Gw) -> None:
    raw = b'{ "model" : "m",\n "input": "h\\u00e9llo", "temperature": 1.50, "extra": [1e3] }\n'
    status, got = await gw.call("POST", "/v1/responses", raw=raw)
    assert status == 200
    engine = gw.engines[gw.holder(got["id"])]
    _, path, sent = engine.seen[-1]
    assert path == "/v1/responses"
    assert sent == raw.rstrip()[:-1] + f',"request_id":"{got["id"]}"}}\n'.encode()


async def test_a_streamed_response_and_a_streamed_retrieve(gw: Gw) -> None:
    status, text = await gw.call("POST", "/v1/responses", {"model": "m", "input": "hi", "stream": True})
    assert status == 200 and isinstance(text, bytes) and text.startswith(b"event: response.created\n")
    rid = json.loads(text.split(b"data: ", 1)[1].split(b"\n", 1)[0])["response"]["id"]
    home = gw.holder(rid)
    status, _ = await gw.call("GET", f"/v1/responses/{rid}?stream=true&starting_after=0")
    assert status == 200
    assert gw.engines[home].seen[-1][:2] == ("GET", f"/v1/responses/{rid}?stream=true&starting_after=0")


async def test_a_retry_names_the_replica_actually_tried(gw: Gw) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # refuses connections: the gateway tries the other replica
    await gw.put("m:1", dead)
    await until(lambda: any(r.endpoint == dead for r in gw.server.app[GATEWAY].table.ready()["m"]))
    for _ in range(4):
        status, got = await gw.call("POST", "/v1/responses", {"model": "m", "input": "hi"})
        assert status == 200
        assert token_of(got["id"]) == token("m", gw.engines["m"].endpoint)
        assert gw.holder(got["id"]) == "m"


async def test_ids_of_gone_replicas_and_made_up_ids_are_404(gw: Gw) -> None:
    status, first = await gw.call("POST", "/v1/responses", {"model": "m", "input": "hi"})
    rid, home = first["id"], gw.holder(first["id"])
    for method, path, body in [("GET", f"/v1/responses/{GONE}", None),
                               ("POST", f"/v1/responses/{GONE}/cancel", None),
                               ("POST", "/v1/responses", {"model": "m", "input": "x", "previous_response_id": GONE})]:
        status, err = await gw.call(method, path, body)
        assert status == 404 and err["error"]["code"] == "response_replica_gone", err
        assert "Start the conversation again" in err["error"]["message"]
    for garbage in ["resp_nope", "resp_" + "0" * 16, "resp_" + "g" * 16 + "_" + "1" * 32, "x%20y", rid.upper()]:
        status, err = await gw.call("GET", f"/v1/responses/{garbage}")
        assert status == 404 and set(err) == {"error"}, (garbage, err)
        status, err = await gw.call("POST", "/v1/responses", {"model": "m", "input": "x",
                                                              "previous_response_id": garbage})
        assert status == 404 and err["error"]["code"] == "response_not_found"
        assert err["error"]["param"] == "previous_response_id"
    # Its engine restarted (its store is empty now): the id names the old incarnation.
    await gw.put(home, gw.engines[home].endpoint, restarts=1)
    await until(lambda: all(r.restarts == 1 for r in gw.server.app[GATEWAY].table.ready()["m"] if r.instance == home))
    status, err = await gw.call("GET", f"/v1/responses/{rid}")
    assert status == 404 and err["error"]["code"] == "response_replica_gone"
    # Not ready (loading, draining) is gone too: the request is never sent to another replica.
    await gw.put(home, gw.engines[home].endpoint, phase=Phase.STARTING)
    await until(lambda: len(gw.server.app[GATEWAY].table.ready()["m"]) == 1)
    status, err = await gw.call("POST", f"/v1/responses/{rid}/cancel")
    assert status == 404 and err["error"]["code"] == "response_replica_gone"
    assert all(not path.endswith("/cancel") for e in gw.engines.values() for _, path, _ in e.seen)


async def test_a_follow_up_names_the_model_that_began_it(gw: Gw) -> None:
    _, first = await gw.call("POST", "/v1/responses", {"model": "m", "input": "hi"})
    status, err = await gw.call("POST", "/v1/responses", {"model": "e", "input": "x",
                                                          "previous_response_id": first["id"]})
    assert status == 400 and err["error"]["param"] in ("model", "previous_response_id")


async def test_a_key_limited_to_other_models_does_not_see_the_response(gw: Gw) -> None:
    _, first = await gw.call("POST", "/v1/responses", {"model": "m", "input": "hi"})
    status, key = await gw.call("POST", "/v1/admin/keys", {"name": "only-e", "models": ["e"]})
    assert status == 201
    for method, path in [("GET", f"/v1/responses/{first['id']}"), ("POST", f"/v1/responses/{first['id']}/cancel")]:
        status, err = await gw.call(method, path, key=key["key"])
        assert status == 404 and err["error"]["code"] == "response_not_found"
    status, key = await gw.call("POST", "/v1/admin/keys", {"name": "only-m", "models": ["m"]})
    assert (await gw.call("GET", f"/v1/responses/{first['id']}", key=key["key"]))[0] == 200
    assert (await gw.call("GET", f"/v1/responses/{first['id']}", key="wrong"))[0] == 401


async def test_the_tokenizer_under_both_spellings_for_a_model_of_any_task(gw: Gw) -> None:
    for path in ("/tokenize", "/v1/tokenize"):
        status, got = await gw.call("POST", path, {"model": "e", "prompt": "ab"})
        assert status == 200 and got["tokens"] == [97, 98]
        assert gw.engines["m"].seen[-1][1] == "/tokenize"
    status, err = await gw.call("POST", "/tokenize", {"model": "nope", "prompt": "ab"})
    assert status == 404 and err["error"]["code"] == "model_not_found"
    status, err = await gw.call("POST", "/v1/detokenize", {"model": "e", "tokens": "ab"})
    assert status == 400 and err["error"]["param"] == "tokens"


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", f"/v1/responses/{GONE}", (GONE, False)),
    ("POST", f"/v1/responses/{GONE}/cancel", (GONE, True)),
    ("POST", f"/v1/responses/{GONE}", None),  # nothing to POST to a response but its cancel
    ("GET", f"/v1/responses/{GONE}/cancel", None),
    ("DELETE", f"/v1/responses/{GONE}", None),
    ("GET", "/v1/responses/", None),
    ("POST", "/v1/responses//cancel", None),
    ("GET", "/v1/responses/a%2Fb", None),  # escaped: aiohttp's to match (and 404)
    ("GET", "/v1/responses/a/b", None),
    ("GET", "/v1/responsesx/a", None),
])
def test_stored_response_paths(method: str, path: str, expected: tuple[str, bool] | None) -> None:
    assert stored_request(method, path) == expected


@pytest.mark.parametrize("path", ["/v1/responses", f"/v1/responses/{GONE}", f"/v1/responses/{GONE}/cancel",
                                  "/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize"])
def test_the_new_paths_need_an_inference_key(path: str) -> None:
    assert scope_of(path) is Scope.INFERENCE
