"""A small real HTTP server on loopback that answers like an OpenAI engine, for gateway tests.

Answers are deterministic bytes (so proxying can be checked byte for byte) and name the engine that
served them. Knobs: `status` (answer every request with it), `hold` (block requests until set, and
record when one is cancelled because its client went away).

GET /metrics answers like vLLM's exporter (Prometheus text, gzipped when the client offers gzip) with the
load set in `waiting`, `running`, `kv_usage`; `metrics_status` makes it fail, `metrics_hold` makes it hang.
"""

from __future__ import annotations

import asyncio
import email.policy
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.parser import BytesParser
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from nebula.core import keys
from nebula.core.model import InstanceStatus, Phase, Task, dumps
from nebula.core.store import Store


@dataclass(frozen=True)
class Received:
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes


def completion_bytes(engine: str, model: str) -> bytes:
    return json.dumps({
        "id": f"chatcmpl-{engine}", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hello from {engine}"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }).encode()


def message_json(engine: str, model: str) -> dict[str, Any]:
    """An answer of vLLM's Messages API (/v1/messages), as Anthropic's SDK parses it."""
    return {"id": f"msg_{engine}", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": f"hello from {engine}"}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 3}}


def sse_chunks(engine: str, model: str) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        body = {"id": f"chatcmpl-{engine}", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    words = ["hello", " from", f" {engine}"]
    return ([chunk({"role": "assistant", "content": words[0]}, None)]
            + [chunk({"content": w}, None) for w in words[1:]]
            + [chunk({}, "stop"), b"data: [DONE]\n\n"])


def vllm_metrics_text(model: str, waiting: float = 0.0, running: float = 0.0, kv_usage: float = 0.0,
                      engines: tuple[str, ...] = ("0",)) -> str:
    """The /metrics text of a vLLM 0.32 server, written as vLLM writes it: by prometheus_client, with its
    process series, the load gauges, counters (with _created samples) and a histogram, labelled
    {engine, model_name}; one label set per engine (data-parallel rank), each with the given load."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    labels = ["engine", "model_name"]
    gauges = [(Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels,
                     registry=registry), running),
              (Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels,
                     registry=registry), waiting),
              (Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels,
                     registry=registry), kv_usage)]
    prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=registry)
    ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels,
                     buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5), registry=registry)
    for e in engines:
        for gauge, value in gauges:
            gauge.labels(e, model).set(value)
        prompt.labels(e, model).inc(913)
        ttft.labels(e, model).observe(0.03)
    return generate_latest(registry).decode()


class FakeEngine:
    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[Received] = []
        self.status: int | None = None
        self.waiting = 0.0
        self.running = 0.0
        self.kv_usage = 0.0
        self.metrics_status: int | None = None
        self.metrics_hold: asyncio.Event | None = None
        self.metrics_polls = 0
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()  # a held request arrived
        self.cancelled = asyncio.Event()  # a held request was cancelled (its client went away)
        self._runner: web.AppRunner | None = None
        self.endpoint = ""
        self.sleep_mode = False  # serve vLLM's dev-mode sleep routes (a GPU engine with --enable-sleep-mode)
        self.sleep_level = 0
        self.sleep_calls: list[str] = []

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", self._handle)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/sleep", self._sleep)
        app.router.add_post("/wake_up", self._sleep)
        app.router.add_get("/is_sleeping", self._sleep)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _sleep(self, request: web.Request) -> web.Response:
        """As vLLM 0.32's dev-mode routes (entrypoints/serve/dev/sleep): absent (404) without sleep mode."""
        self.sleep_calls.append(request.path_qs)
        if not self.sleep_mode:
            return web.json_response({"detail": "Not Found"}, status=404)
        if request.path == "/sleep":
            self.sleep_level = int(request.query.get("level", "1"))
            return web.json_response({"status": "sleeping", "level": self.sleep_level})
        if request.path == "/wake_up":
            self.sleep_level = 0
            return web.json_response({"status": "awake", "tags": None})
        return web.json_response({"is_sleeping": self.sleep_level > 0})

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics_polls += 1
        if self.metrics_hold is not None:
            await self.metrics_hold.wait()
        if self.metrics_status is not None:
            return web.Response(status=self.metrics_status, text="no metrics")
        body = vllm_metrics_text("m", self.waiting, self.running, self.kv_usage).encode()
        headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)  # as prometheus_client's exporter (vLLM's) does when offered
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path_qs, request.headers, body))
        if self.status is not None:
            return web.json_response({"error": {"message": "busy", "type": "server_error", "param": None,
                                                "code": None}}, status=self.status)
        if self.hold is not None:
            self.held.set()
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.match_info["tail"].startswith("audio/"):
            return await self._transcribe(request, body)
        parsed = json.loads(body)
        model = parsed.get("model", "")
        if request.match_info["tail"] == "messages":
            return web.json_response(message_json(self.name, model), headers={"X-Engine": self.name})
        if request.match_info["tail"] == "chat/completions" and parsed.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Engine": self.name})
            await resp.prepare(request)
            for chunk in sse_chunks(self.name, model):
                await resp.write(chunk)
                await asyncio.sleep(0.005)
            await resp.write_eof()
            return resp
        return web.Response(body=completion_bytes(self.name, model), content_type="application/json",
                            headers={"X-Engine": self.name})


    async def _transcribe(self, request: web.Request, body: bytes) -> web.Response:
        """As vLLM's /v1/audio/*: parse the multipart form and answer with what it held. The parser is the
        standard library's MIME parser, not aiohttp's (which the gateway uses), so the two check each other."""
        head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
        message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields: dict[object, bytes] = {}
        for part in message.iter_parts() if message.is_multipart() else ():
            payload = part.get_payload(decode=True)
            name = part.get_param("name", header="content-disposition")
            fields[name] = payload if isinstance(payload, bytes) else b""
        if "file" not in fields or "model" not in fields or message.defects:
            return web.json_response({"error": {"message": f"bad form: {message.defects}", "type": "BadRequestError",
                                                "param": None, "code": 400}}, status=400)
        return web.json_response({"text": f"hello from {self.name}", "model": fields["model"].decode(),
                                  "file_bytes": len(fields["file"])}, headers={"X-Engine": self.name})


async def put_instance(store: Store, instance: str, endpoint: str, phase: Phase = Phase.READY,
                       model: str = "m", task: Task = Task.GENERATE) -> None:
    st = InstanceStatus(instance=instance, model=model, node="n1", phase=phase, endpoint=endpoint, task=task,
                        message="" if phase is Phase.READY else "loading")
    await store.put(keys.instance_key(instance), dumps(st.to_dict()))


async def until(cond: Callable[[], bool | Awaitable[bool]], within_s: float = 5.0) -> None:
    """Poll `cond` until true; fail the test when it is still false after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        result = cond()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def engines(*names: str) -> AsyncIterator[list[FakeEngine]]:
    """For fixtures: started engines, stopped afterwards."""
    started = [FakeEngine(n) for n in names]
    for e in started:
        await e.start()
    try:
        yield started
    finally:
        for e in started:
            if e.hold is not None:
                e.hold.set()
            if e.metrics_hold is not None:
                e.metrics_hold.set()
            await e.stop()
