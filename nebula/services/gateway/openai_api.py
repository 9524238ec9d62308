"""The OpenAI-compatible endpoints: validate at the edge, then forward the original bytes to a replica.

The body is parsed once to validate it, learn the model and compute its prefix-affinity key, but what
goes on is the client's own bytes, so fields the gateway does not know reach the engine exactly as sent.

The handlers take a `Call` and answer through a `Reply` (services/http/reply.py), so one handler serves
both of the gateway's servers: the data-plane server (dataplane.py routes to it) and aiohttp, through
`routes()`, for a connection aiohttp took over.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Final

from aiohttp import web

from nebula.adapters.upstream_http import UpstreamError
from nebula.adapters.upstream_response import UpstreamResponse
from nebula.core.apikeys import KeyRecord
from nebula.core.model import Task
from nebula.core.routing import prefix_key
from nebula.errors import ValidationError
from nebula.services.gateway.auth import check_model_allowed, model_allowed, request_key
from nebula.services.gateway.exchange import REQUEST_ID_HEADER, Exchange, request_id
from nebula.services.gateway.forward import Respond, Target, forward
from nebula.services.gateway.lora_routing import adapter_entries, find_adapter, resolve_model
from nebula.services.gateway.state import GATEWAY, GatewayState
from nebula.services.gateway.stored_responses import create_target
from nebula.services.gateway.validation import ENDPOINTS, Endpoint, check_request, parse_body
from nebula.services.http.errors import ApiError, Handler, unavailable
from nebula.services.http.relay import RelayStats, forward_headers, relay, skipped_with
from nebula.services.http.reply import AiohttpReply, Reply, send_json

log = logging.getLogger(__name__)

CLIENT_CLOSED: Final = 499  # nginx's convention for "the client went away before the answer"
# The body is always the client's JSON, whatever Content-Type the client claimed.
_JSON: Final = {"Content-Type": "application/json"}
# The client headers an inference request does not forward: the gateway sets these two itself.
_FORWARD_SKIP: Final = skipped_with(*_JSON, REQUEST_ID_HEADER)
# Endpoints whose requests go to particular replicas, or with a body per replica: (state, parsed body, raw
# body, the model's target) -> the request's target.
Aim = Callable[[GatewayState, Mapping[str, Any], bytes, Target], Target]
_AIMS: Final[Mapping[str, Aim]] = {"responses": create_target}


class Call:
    """An OpenAI request as the handlers see it, from either of the gateway's servers."""

    # A plain class: made per request on the compiled path (relay.RelayStats says why).
    __slots__ = ("body", "headers", "key", "path_qs", "request_id")

    def __init__(self, path_qs: str, headers: Mapping[str, str], body: bytes, key: KeyRecord | None,
                 request_id: str) -> None:
        self.path_qs = path_qs
        self.headers = headers  # compared without case
        self.body = body
        self.key = key  # the key it was authenticated with; None while the gateway is open
        self.request_id = request_id


async def serve_inference(st: GatewayState, endpoint: Endpoint, call: Call, reply: Reply) -> None:
    """Validate `call` for `endpoint`, then forward it to a replica and relay the answer to `reply`.

    Raises ApiError (or ValidationError) for what is answered before any byte of the answer went out.
    """
    path = endpoint.path
    generative = endpoint.task is Task.GENERATE
    status = 500
    started = time.monotonic()
    ex = Exchange(call.request_id, "unknown")
    streaming = False
    span = None
    inflight = st.metrics.inflight(path)
    inflight.inc()
    try:
        body = parse_body(call.body)
        model = check_request(endpoint, body)
        # Before the lookup: a key restricted to other models learns nothing about which exist.
        check_model_allowed(call.key, model)
        resolved = resolve_model(st, model)  # a model, or a LoRA adapter on its base's replicas
        spec, target = resolved if resolved is not None else (None, None)
        if spec is None and not st.view.models_synced:
            # Started while the store is unreachable: "unknown model" would be a lie.
            raise unavailable("the gateway has not loaded the model list yet; retry shortly",
                              code="models_not_loaded")
        if spec is None:
            raise ApiError(404, f"The model '{model}' does not exist or is not loaded", param="model",
                           code="model_not_found")
        ex.model = model
        if endpoint.task is not None and spec.task is not endpoint.task:
            raise ApiError(400, f"model '{model}' serves task '{spec.task.value}'; "
                           f"/v1/{path} needs a '{endpoint.task.value}' model",
                           param="model", code="model_not_supported")
        # check_request proved body a dict.
        streaming = isinstance(body, dict) and body.get("stream") is True
        # The key keeps a conversation on one replica's prefix cache.
        prefix = functools.partial(prefix_key, body) if generative and isinstance(body, dict) else None
        respond: Respond = relay
        # A stored response's follow-up narrows the target (a LoRA adapter's, too) to the replica holding it.
        aim = _AIMS.get(path)
        if aim is not None and target is not None and isinstance(body, dict):
            target = aim(st, body, call.body, target)
        if path == "rerank" and isinstance(body, dict) and body.get("return_documents") is False:
            respond = _rerank_without_documents
        # vLLM takes X-Request-ID as its own request id, so its logs name the same request.
        headers = forward_headers(call.headers, {**_JSON, REQUEST_ID_HEADER: ex.request_id}, _FORWARD_SKIP)
        if st.tracer is not None:
            span = st.tracer.start(f"POST /v1/{path}", call.headers, headers,
                                   {"nebula.model": model, "nebula.request_id": ex.request_id})
        # The tokenizer is /tokenize on the engine, whichever spelling the client used.
        upstream_path = call.path_qs
        if endpoint.engine_path:
            upstream_path = endpoint.engine_path + call.path_qs[len(call.path_qs.partition("?")[0]):]
        served = target.model if target is not None else model  # a LoRA adapter's load is its base's
        sent = (upstream_path, st, ex, call.body, headers, prefix, respond, target)
        if spec.scaling is not None and st.waker is not None:  # elastic: held while it wakes (wake.py)
            await st.waker.serve(served, call.path_qs.partition("?")[0], streaming, call.headers, reply,
                                 lambda to: forward(to, *sent), target.eligible if target is not None else None)
        else:
            st.load.begin(served)  # the model's in-flight count and last request (load_report.py)
            try:
                await forward(reply, *sent)
            finally:
                st.load.end(served)
        status = reply.status
    except ApiError as e:
        status = e.status
        raise
    except ValidationError:
        status = 400  # answered so by the server's error handling
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_CLOSED
        raise
    finally:
        inflight.dec()
        _observe(st, path, ex, started, status, generative, streaming)
        if span is not None and st.tracer is not None:
            st.tracer.finish(span, status, ex.replica, ex.attempts)


def _observe(st: GatewayState, path: str, ex: Exchange, started: float, status: int, generative: bool,
             streaming: bool) -> None:
    model = ex.model
    st.metrics.requests(model, path, str(status)).inc()
    elapsed = time.monotonic() - started
    st.metrics.latency(model, path).observe(elapsed)
    stats = ex.stats
    if generative and stats.first_chunk_at and status == 200:
        st.metrics.ttft(model, path).observe(stats.first_chunk_at - started)
        if streaming and stats.complete and stats.events >= 3:
            st.metrics.itl(model, path).observe((stats.last_chunk_at - stats.first_chunk_at) / (stats.events - 1))
    access_log = st.cfg.access_log
    if access_log == "all" or (access_log == "errors" and status >= 500):
        log.log(logging.WARNING if status >= 500 else logging.INFO,
                "POST /v1/%s model=%s status=%d %.3fs replica=%s attempts=%d", path, model, status, elapsed,
                ex.replica or "-", ex.attempts, extra={**ex.log_fields(), "NEBULA_STATUS": status})


async def _rerank_without_documents(reply: Reply, upstream: UpstreamResponse, stats: RelayStats) -> None:
    """Cohere/Jina `return_documents: false`, which vLLM does not implement: drop the echoed documents.

    The one response the gateway rewrites; rerank answers are small and never streamed.
    """
    if upstream.status != 200:
        await relay(reply, upstream, stats)
        return
    try:
        payload = json.loads(await upstream.read())
    except TimeoutError:
        raise ApiError(504, "the model did not answer in time", code="timeout") from None
    except (ValueError, UpstreamError):
        raise ApiError(502, "the engine sent an invalid rerank response", code="upstream_error") from None
    if isinstance(payload, dict) and isinstance(payload.get("results"), list):
        for result in payload["results"]:
            if isinstance(result, dict):
                result.pop("document", None)
    await send_json(reply, payload)


def models_list(st: GatewayState, key: KeyRecord | None) -> dict[str, object]:
    """GET /v1/models: the models `key` may use, each with its phase counts and replicas."""
    phases = st.table.phases()
    data = [st.view.model_entry(spec, phases.get(name, Counter())) for name, spec in sorted(st.view.models.items())
            if model_allowed(key, name)]
    return {"object": "list", "data": data + adapter_entries(st, key)}


def model_entry(st: GatewayState, key: KeyRecord | None, name: str) -> dict[str, object]:
    """GET /v1/models/{name}; ApiError 404 for a model that does not exist or `key` may not use."""
    spec = st.view.models.get(name)
    if spec is None and (adapter := find_adapter(st, key, name)) is not None:
        return adapter
    if spec is None or not model_allowed(key, name):
        raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return st.view.model_entry(spec, st.table.phases().get(name, Counter()))


# --- through aiohttp (connections the data-plane server handed over; see services/http/fastserver.py) ---

def _call(request: web.Request, body: bytes) -> Call:
    return Call(request.path_qs, request.headers, body, request_key(request), request_id(request))


def _inference_route(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        reply = AiohttpReply(request)
        await serve_inference(request.app[GATEWAY], endpoint, _call(request, await request.read()), reply)
        return reply.answer()

    return handle


async def _list_models(request: web.Request) -> web.Response:
    return web.json_response(models_list(request.app[GATEWAY], request_key(request)))


async def _get_model(request: web.Request) -> web.Response:
    return web.json_response(model_entry(request.app[GATEWAY], request_key(request), request.match_info["name"]))


def routes() -> list[web.RouteDef]:
    return [web.post(p, _inference_route(e)) for e in ENDPOINTS.values() for p in e.paths] + [
        web.get("/v1/models", _list_models),
        web.get("/v1/models/{name}", _get_model),
    ]
