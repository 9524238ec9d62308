"""The simulated engine and the minimal proxy of scripts/bench_gateway.py, and the wire constants they share with
the load generator: an engine answering chat completions, Messages and Responses like vLLM (SSE chunks or one
JSON body) with the TTFT, per-token delay and token count each request's body asks for, and the baseline
reverse proxy (read the body, POST it to the engine, stream the bytes back)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

MODEL = "bench"
HOST = "127.0.0.1"  # loopback only, everywhere
PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"  # Anthropic's Messages API (the `messages_*` scenarios)
RESPONSES_PATH = "/v1/responses"  # OpenAI's Responses API (the `responses_*` scenarios)
PATHS = {"chat": PATH, "messages": MESSAGES_PATH, "responses": RESPONSES_PATH}
# What a streamed Messages answer ends with (Anthropic's streaming documentation; vLLM writes the same).
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

# ---------------------------------------------------------------------------------------------------------
# Engine simulator
# ---------------------------------------------------------------------------------------------------------

def _sse(req_id: str, model: str, delta: str, finish: str | None) -> bytes:
    fin = "null" if finish is None else f'"{finish}"'
    return (f'data: {{"id":"{req_id}","object":"chat.completion.chunk","created":1,"model":"{model}",'
            f'"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{fin}}}]}}\n\n').encode()


def _event(kind: str, data: str) -> bytes:
    return f"event: {kind}\ndata: {data}\n\n".encode()


class _Answer:
    """What a request's body asks of the simulator: the token count (under the API's own field), the time to
    the first token and per token after it, and whether to stream."""

    def __init__(self, body: dict[str, Any], tokens_field: str) -> None:
        self.tokens = int(body.get(tokens_field) or 16)
        self.ttft = float(body.get("bench_ttft_ms", 0)) / 1000
        self.tpot = float(body.get("bench_tpot_ms", 0)) / 1000
        self.stream = bool(body.get("stream"))
        self.start = asyncio.get_running_loop().time()

    async def whole(self) -> None:
        """Wait as long as the whole answer takes (a non-streamed one)."""
        if self.ttft + self.tokens * self.tpot > 0:
            await asyncio.sleep(self.ttft + self.tokens * self.tpot)

    async def open(self, request: web.Request) -> web.StreamResponse:
        """The stream's head at once (as vLLM's StreamingResponse sends it), then wait for the first token."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        if self.ttft > 0:
            await asyncio.sleep(self.ttft)
        return resp

    async def tokens_to(self, resp: web.StreamResponse, token: bytes) -> None:
        loop = asyncio.get_running_loop()
        for i in range(self.tokens):
            if self.tpot > 0:
                # Sleep to an absolute schedule so timer slack does not accumulate over 128 tokens.
                delay = self.start + self.ttft + (i + 1) * self.tpot - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await resp.write(token)


async def _engine_chat(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    model = str(body.get("model", MODEL))
    answer = _Answer(body, "max_tokens")
    req_id = f"chatcmpl-{id(request):x}"
    if not answer.stream:
        await answer.whole()
        return web.json_response({
            "id": req_id, "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * answer.tokens},
                         "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": answer.tokens, "total_tokens": 10 + answer.tokens},
        })
    resp = await answer.open(request)
    await resp.write(_sse(req_id, model, '{"role":"assistant","content":""}', None))
    await answer.tokens_to(resp, _sse(req_id, model, '{"content":" tok"}', None))
    await resp.write(_sse(req_id, model, "{}", "length") + b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _engine_messages(request: web.Request) -> web.StreamResponse:
    """vLLM's /v1/messages as the engine simulator: Anthropic's message, or its SSE event sequence."""
    body = json.loads(await request.read())
    model = str(body.get("model", MODEL))
    answer = _Answer(body, "max_tokens")
    msg_id = f"msg_{id(request):x}"
    usage = f'{{"input_tokens":10,"output_tokens":{answer.tokens}}}'
    if not answer.stream:
        await answer.whole()
        return web.json_response({
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": " tok" * answer.tokens}], "stop_reason": "max_tokens",
            "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": answer.tokens}})
    resp = await answer.open(request)
    await resp.write(_event("message_start", f'{{"type":"message_start","message":{{"id":"{msg_id}","type":'
                                             f'"message","role":"assistant","model":"{model}","content":[],'
                                             f'"stop_reason":null,"stop_sequence":null,"usage":{usage}}}}}')
                     + _event("content_block_start", '{"type":"content_block_start","index":0,'
                                                     '"content_block":{"type":"text","text":""}}'))
    await answer.tokens_to(resp, _event("content_block_delta", '{"type":"content_block_delta","index":0,'
                                                               '"delta":{"type":"text_delta","text":" tok"}}'))
    await resp.write(_event("content_block_stop", '{"type":"content_block_stop","index":0}')
                     + _event("message_delta", f'{{"type":"message_delta","delta":{{"stop_reason":"max_tokens",'
                                               f'"stop_sequence":null}},"usage":{usage}}}')
                     + MESSAGE_STOP)
    await resp.write_eof()
    return resp


async def _engine_responses(request: web.Request) -> web.StreamResponse:
    """vLLM's /v1/responses as the engine simulator: the response, or its SSE events (created, text deltas,
    completed); the response's id is the body's request_id, as vLLM's is (the gateway sets it)."""
    body = json.loads(await request.read())
    answer = _Answer(body, "max_output_tokens")
    tokens = answer.tokens
    response = {"id": str(body.get("request_id", f"resp_{id(request):x}")), "object": "response",
                "model": str(body.get("model", MODEL)), "status": "incomplete",
                "output": [{"type": "message", "role": "assistant", "status": "incomplete",
                            "content": [{"type": "output_text", "text": " tok" * tokens, "annotations": []}]}],
                "usage": {"input_tokens": 10, "output_tokens": tokens, "total_tokens": 10 + tokens}}
    if not answer.stream:
        await answer.whole()
        return web.json_response(response)
    resp = await answer.open(request)
    created = json.dumps({"type": "response.created", "response": {**response, "status": "in_progress",
                                                                  "output": []}})
    await resp.write(_event("response.created", created))
    await answer.tokens_to(resp, _event("response.output_text.delta", '{"type":"response.output_text.delta",'
                                        '"item_id":"msg_1","output_index":0,"content_index":0,"delta":" tok"}'))
    await resp.write(_event("response.completed", json.dumps({"type": "response.completed", "response": response})))
    await resp.write_eof()
    return resp


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="")


def engine_app() -> web.Application:
    app = web.Application()
    app.router.add_post(PATH, _engine_chat)
    app.router.add_post(MESSAGES_PATH, _engine_messages)
    app.router.add_post(RESPONSES_PATH, _engine_responses)
    app.router.add_get("/health", _ok)
    return app


# ---------------------------------------------------------------------------------------------------------
# Minimal single-hop reverse proxy (the baseline)
# ---------------------------------------------------------------------------------------------------------

SESSION = web.AppKey("session", aiohttp.ClientSession)


def proxy_app(upstream: str) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[SESSION].post(upstream + request.path_qs, data=body,
                                             headers={"Content-Type": "application/json"}) as up:
            resp = web.StreamResponse(status=up.status,
                                      headers={"Content-Type": up.headers.get("Content-Type", "application/json")})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def session_ctx(app: web.Application) -> Any:
        # No pool cap and no decompression: a proxy passes bytes on as they come (as Nebula's engine hop does).
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/{tail:.*}", handle)
    return app


def serve(app: web.Application, port: int, use_uvloop: bool = False) -> None:
    # No access log in either baseline or simulator: Nebula's services run without one too.
    loop = None
    if use_uvloop:  # --uvloop-proxy: uvloop is Nebula's dependency (the gateway's default loop)
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, loop=loop)
