"""The web console over loopback, on an in-memory store: its files and headers, sign-in, the session
cookie as an admin credential (CSRF on state changes, revocation), the live feed and the playground's
chat (which must not carry the console's cookie to an engine)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.discovery import ServiceKind
from nebula.core.model import Gpu, ModelSpec, NodeRecord, dumps
from nebula.core.rollout_records import DrainRecord, RolloutState, RolloutStatus
from nebula.services.gateway import console_feed
from nebula.services.gateway import console_session as cs
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, engines, put_instance, until
from tests.unit.test_gpu_live import agents

ADMIN = "admin-token"
STATIC = Path(__file__).parents[2] / "nebula/services/gateway/console_static"


@dataclass
class Console:
    server: GatewayServer
    http: aiohttp.ClientSession
    engine: FakeEngine
    csrf: str = ""

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def call(self, method: str, path: str, body: object = None, csrf: bool = True,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        h = {cs.CSRF_HEADER: self.csrf} if csrf and self.csrf else {}
        async with self.http.request(method, self.url(path), json=body, headers=h | (headers or {})) as resp:
            raw = await resp.read()
            return resp.status, json.loads(raw) if resp.content_type == "application/json" else raw

    async def login(self, key: str) -> tuple[int, Any]:
        status, body = await self.call("POST", "/ui/login", {"key": key}, csrf=False)
        if status == 200:
            self.csrf = body["csrf"]
        return status, body


@pytest.fixture
async def console() -> AsyncIterator[Console]:
    async for (engine,) in engines("a"):
        store = MemoryStore()
        await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/models/x").to_dict()))
        await put_instance(store, "m", engine.endpoint, model="m")
        cfg = GatewayConfig(load_poll_s=0, admin_key_hashes=(hashlib.sha256(ADMIN.encode()).hexdigest(),))
        app = build_gateway_app(cfg, store, CollectorRegistry())
        server = GatewayServer(app)
        await server.start_server()
        # unsafe: the test server is 127.0.0.1, which aiohttp's default jar keeps no cookies for
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        await until(lambda: app[GATEWAY].auth.synced and len(app[GATEWAY].table.ready()) == 1)  # noqa: B023
        try:
            yield Console(server, http, engine)
        finally:
            await http.close()
            await server.close()


async def test_the_page_and_its_files_carry_a_strict_policy_and_nothing_inline(console: Console) -> None:
    async with console.http.get(console.url("/ui/")) as resp:
        page = await resp.text()
        assert resp.status == 200 and resp.headers["Content-Security-Policy"] == cs.CSP
        assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["Cache-Control"] == "no-store"
    assert not re.search(r"<script(?![^>]*\bsrc=)", page) and "style=" not in page and "<style" not in page
    for name in ("app.js", "api.js", "ui.js", "fleet.js", "forms.js", "actions.js", "playground.js", "logs.js",
                 "console.css"):
        async with console.http.get(console.url(f"/ui/static/{name}")) as resp:
            assert resp.status == 200 and resp.headers["X-Content-Type-Options"] == "nosniff"
            text = await resp.text()
            assert ".innerHTML" not in text and "http://" not in text.replace("http://www.w3.org", ""), name
    status, _ = await console.call("GET", "/ui/static/../console.py")
    assert status == 404
    async with console.http.get(console.url("/ui"), allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "/ui/"


async def test_a_wrong_key_is_refused_and_an_admin_key_opens_a_session(console: Console) -> None:
    assert (await console.login("nope"))[0] == 401
    status, body = await console.call("POST", "/ui/login", {"key": ""}, csrf=False)
    assert status == 400 and body["error"]["param"] == "key"
    assert (await console.call("GET", "/v1/admin/models"))[0] == 401  # no cookie, no key
    async with console.http.post(console.url("/ui/login"), json={"key": ADMIN}) as resp:
        cookie = resp.headers["Set-Cookie"]
        console.csrf = (await resp.json())["csrf"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert f"Max-Age={cs.SESSION_S}" in cookie
    status, models = await console.call("GET", "/v1/admin/models")
    assert status == 200 and [m["name"] for m in models["data"]] == ["m"]
    status, session = await console.call("GET", "/ui/api/session")
    assert status == 200 and session["csrf"] == console.csrf and session["key"]["name"] == "config admin key"


async def test_a_state_change_without_the_csrf_token_is_refused(console: Console) -> None:
    await console.login(ADMIN)
    status, body = await console.call("POST", "/v1/admin/keys", {"name": "x", "scopes": ["admin"]}, csrf=False)
    assert status == 403 and body["error"]["code"] == "csrf_failed"
    status, body = await console.call("PATCH", "/v1/admin/models/m", {"replicas": 2},
                                      headers={cs.CSRF_HEADER: "forged"}, csrf=False)
    assert status == 403
    status, _ = await console.call("POST", "/v1/admin/keys", {"name": "ops", "scopes": ["admin"]})
    assert status == 201


async def test_revoking_the_sessions_key_ends_the_session(console: Console) -> None:
    await console.login(ADMIN)
    _, key = await console.call("POST", "/v1/admin/keys", {"name": "ops", "scopes": ["admin"]})
    _, spare = await console.call("POST", "/v1/admin/keys", {"name": "spare", "scopes": ["admin"]})
    other = Console(console.server, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)), console.engine)
    try:
        assert (await other.login(key["key"]))[0] == 200
        assert (await other.call("GET", "/v1/admin/keys"))[0] == 200
        assert (await console.call("DELETE", f"/v1/admin/keys/{key['id']}"))[0] == 200
        status, body = await other.call("GET", "/v1/admin/keys")
        assert status == 401 and body["error"]["code"] == "session_revoked"
        _, inference = await console.call("POST", "/v1/admin/keys", {"name": "app", "scopes": ["inference"]})
        assert (await other.login(inference["key"]))[0] == 403  # not an admin key
    finally:
        await other.http.close()
    assert spare["id"]


async def read_feed(console: Console, events: dict[str, Any]) -> None:
    """The feed's events, until it has pushed the fleet and the figures."""
    async with console.http.get(console.url("/ui/api/events")) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        kind = ""
        async for line in resp.content:
            text = line.decode().strip()
            if text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: "):
                events[kind] = json.loads(text[6:])
            if {"fleet", "figures"} <= set(events):
                break


async def test_the_feed_pushes_the_fleet_and_figures(console: Console) -> None:
    await console.login(ADMIN)
    # What `nebula status` shows for maintenance goes to the page too: a drained node, an update's progress.
    store = console.server.app[GATEWAY].store
    await store.put(keys.node_key("n1"), dumps(NodeRecord(name="n1", address="127.0.0.1", port_min=18000,
                                                                   port_max=18010).to_dict()))
    await store.put(keys.drain_key("n1"), dumps(DrainRecord(node="n1", since=1.0, by="ops").to_dict()))
    await store.put(keys.rollout_status_key("m"), dumps(RolloutStatus(
        model="m", state=RolloutState.ROLLING, target="t", replaced=0, total=1, surge="m:1").to_dict()))
    # A GPU node: its utilisation and temperature come from its agent's /metrics (a real one, registered).
    gpu = Gpu(index=0, name="NVIDIA H100 80GB HBM3", memory_total_mib=81559, memory_used_mib=40960)
    await store.put(keys.node_key("g1"), dumps(NodeRecord(name="g1", address="127.0.0.1", port_min=18000,
                                                          port_max=18010, gpus=(gpu,)).to_dict()))
    events: dict[str, Any] = {}
    async with agents() as (services, _):
        agent = replace(services[0], node="g1")
        await store.put(keys.service_key(ServiceKind.NODE.value, "g1", agent.address), dumps(agent.to_dict()))
        await read_feed(console, events)
    assert [m["name"] for m in events["fleet"]["models"]] == ["m"]
    assert events["fleet"]["models"][0]["ready"] == 1 and isinstance(events["figures"]["models"], dict)
    assert events["fleet"]["models"][0]["rollout"] == "rolling 0/1 (waiting for m:1)"
    assert [(n["name"], n.get("drain"), n["placements"]) for n in events["fleet"]["nodes"]] == [
        ("g1", None, 0), ("n1", "drained", 0)]
    assert events["fleet"]["nodes"][0]["gpus"][0] | {"utilization": 0.37, "temperature_c": 61.0} == \
        events["fleet"]["nodes"][0]["gpus"][0]


async def test_a_console_closed_mid_feed_ends_its_stream_quietly(console: Console, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(console_feed, "TICK_S", 0.01)
    monkeypatch.setattr(console_feed, "FIGURES_S", 0.02)  # the next write comes at once after the close
    feed, ended = console_feed._feed, []

    async def watched(*args: Any) -> None:
        try:
            await feed(*args)
        except BaseException as e:
            ended.append(type(e).__name__)
            raise
        ended.append("returned")

    monkeypatch.setattr(console_feed, "_feed", watched)
    await console.login(ADMIN)
    with caplog.at_level(logging.DEBUG):
        async with console.http.get(console.url("/ui/api/events")) as resp:
            await resp.content.readline()  # the stream is up; the browser tab closes
        await until(lambda: bool(ended))
    # The server cancels the handler of a client that left (handler_cancellation, as in production); a write
    # that comes first meets the closing transport instead: either way the stream ends without an error.
    assert ended in (["CancelledError"], ["ConnectionResetError"], ["ClientConnectionResetError"]), ended
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_the_feed_needs_a_session(console: Console) -> None:
    assert (await console.call("GET", "/ui/api/events"))[0] == 401


async def test_the_playground_chats_without_passing_the_cookie_on(console: Console) -> None:
    await console.login(ADMIN)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert (await console.call("POST", "/ui/api/chat", body, csrf=False))[0] == 403
    status, answer = await console.call("POST", "/ui/api/chat", body)
    assert status == 200 and answer["model"] == "m"
    seen = console.engine.received[-1]
    assert seen.path == "/v1/chat/completions"
    assert "Cookie" not in seen.headers and cs.CSRF_HEADER not in seen.headers
    status, err = await console.call("POST", "/ui/api/chat", {"model": "nope", "messages": []})
    assert status in (400, 404) and err["error"]["message"]


async def test_logout_clears_the_cookie(console: Console) -> None:
    await console.login(ADMIN)
    assert (await console.call("POST", "/ui/logout", {}))[0] == 200
    assert (await console.call("GET", "/v1/admin/models"))[0] == 401


def test_the_console_files_are_package_data() -> None:
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert "console_static/*" in pyproject
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "app.js", "console.css"}
