"""What an API key may do at the gateway over loopback: the models it is allowed (the request's key as the
handlers see it) and its limits, 429 with Retry-After (the keys themselves: test_gateway_keys_api.py)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from nebula.core import records
from nebula.core.apikeys import KeyRequest, digest
from nebula.services.gateway.auth import Authenticator, check_model_allowed, model_allowed, request_key
from nebula.services.gateway.pipeline import RequestPipeline, pipeline_middleware
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.errors import ApiError, error_middleware
from tests.harness.mirrors import mirrored
from tests.unit.fake_engine import until
from tests.unit.gateway_keys_fixtures import (
    ADMIN,
    CHAT,
    Clock,
    MakeGw,
    assert_error,
    engine_fixture,  # noqa: F401 (the fixture engine, which make_gw takes)
    make_gw_fixture,  # noqa: F401 (the fixture make_gw)
    put_key,
    sha,
    until_status,
)

# --- allowed models and the request's key ----------------------------------------------------------------

async def test_request_key_and_model_checks_for_the_handlers() -> None:
    auth = Authenticator((), (), Clock())
    auth.update_keys(mirrored(records.APIKEYS))
    record = KeyRequest.from_dict({"name": "k", "models": ["m"]}).record("0000000000000001", digest("tok"), 0)
    auth.created(record)

    async def handler(request: web.Request) -> web.Response:
        key = request_key(request)
        model = request.query["model"]
        check_model_allowed(key, model)
        return web.json_response({"key": key.id if key else None, "model": model})

    app = web.Application(middlewares=[error_middleware, pipeline_middleware(RequestPipeline(auth))])
    app.router.add_get("/v1/x", handler)
    server = TestServer(app)  # not a gateway app: aiohttp alone serves it
    await server.start_server()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer tok"}) as http:
            async with http.get(server.make_url("/v1/x?model=m")) as resp:
                assert resp.status == 200 and await resp.json() == {"key": record.id, "model": "m"}
            async with http.get(server.make_url("/v1/x?model=n")) as resp:
                assert resp.status == 403
                body = await resp.json()
                assert_error(body, "model_not_allowed")
                assert body["error"]["param"] == "model" and body["error"]["type"] == "permission_error"
    finally:
        await server.close()
    assert model_allowed(None, "anything") and model_allowed(record, "m") and not model_allowed(record, "n")
    with pytest.raises(ApiError):
        check_model_allowed(record, "n")


# --- per-key limits ---------------------------------------------------------------------------------------

async def test_a_key_limited_to_models_sees_and_uses_only_those(make_gw: MakeGw) -> None:
    gw = await make_gw(admin_key_hashes=(sha(ADMIN),))
    token = (await gw.create_key(name="only-m", models=["m"]))["key"]
    assert (await gw.call("POST", "/v1/chat/completions", token, CHAT))[0] == 200
    other = {**CHAT, "model": "other"}
    status, _, body = await gw.call("POST", "/v1/chat/completions", token, other)
    assert status == 403
    assert_error(body, "model_not_allowed")
    # Refused before the lookup: an unknown model looks the same as a forbidden one.
    status, _, body = await gw.call("POST", "/v1/chat/completions", token, {**CHAT, "model": "nope"})
    assert status == 403
    status, _, listed = await gw.call("GET", "/v1/models", token)
    assert status == 200 and [m["id"] for m in listed["data"]] == ["m"]
    assert (await gw.call("GET", "/v1/models/other", token))[0] == 404
    assert (await gw.call("GET", "/v1/models/other", ADMIN))[0] == 200


async def test_requests_per_minute_429_with_retry_after(make_gw: MakeGw) -> None:
    gw = await make_gw()
    await put_key(gw.store, "00000000000000cc", "t", limits={"requests_per_minute": 2})
    await until_status(gw, "GET", "/v1/models", None, 401)
    gw.clock.now += 60  # the key's bucket starts full whenever it was first used
    assert (await gw.call("POST", "/v1/chat/completions", "t", CHAT))[0] == 200
    assert (await gw.call("GET", "/v1/models", "t"))[0] == 200
    status, headers, body = await gw.call("POST", "/v1/chat/completions", "t", CHAT)
    assert status == 429 and headers["Retry-After"] == "30"
    assert_error(body, "rate_limit_exceeded")
    assert body["error"]["type"] == "rate_limit_error"
    gw.clock.now += 30
    assert (await gw.call("POST", "/v1/chat/completions", "t", CHAT))[0] == 200
    # The real openai client sees a RateLimitError (no retries, so the test sees the first answer).
    client = openai.AsyncOpenAI(base_url=str(gw.server.make_url("/v1")), api_key="t", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await client.close()


async def test_concurrency_slot_is_held_for_the_response_and_freed_on_disconnect(make_gw: MakeGw) -> None:
    gw = await make_gw()
    await put_key(gw.store, "00000000000000dd", "t", limits={"max_concurrent": 1})
    await until_status(gw, "GET", "/v1/models", None, 401)
    auth = gw.server.app[GATEWAY].auth
    gw.engine.hold = asyncio.Event()
    first = asyncio.create_task(gw.call("POST", "/v1/chat/completions", "t", CHAT))
    await asyncio.wait_for(gw.engine.held.wait(), 5)
    status, headers, body = await gw.call("POST", "/v1/chat/completions", "t", CHAT)
    assert status == 429 and headers["Retry-After"] == "1"
    assert_error(body, "concurrency_limit_exceeded")
    gw.engine.hold.set()
    assert (await first)[0] == 200
    assert auth.limiter.inflight("00000000000000dd") == 0
    # A streamed answer holds the slot until its last byte; a client that goes away frees it.
    gw.engine.hold = asyncio.Event()
    gw.engine.held.clear()
    gone = asyncio.create_task(gw.call("POST", "/v1/chat/completions", "t", {**CHAT, "stream": True}))
    await asyncio.wait_for(gw.engine.held.wait(), 5)
    assert auth.limiter.inflight("00000000000000dd") == 1
    gone.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    await asyncio.wait_for(gw.engine.cancelled.wait(), 5)
    await until(lambda: auth.limiter.inflight("00000000000000dd") == 0)
    gw.engine.hold = None
    assert (await gw.call("POST", "/v1/chat/completions", "t", {**CHAT, "stream": True}))[0] == 200
