"""The OpenAI-compatible endpoints: validate at the edge, then forward the original bytes to a replica.

The body is parsed once to validate it, learn the model and compute its prefix-affinity key, but what
goes on is the client's own bytes, so fields the gateway does not know reach the engine exactly as sent.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
from aiohttp import web

from nebula.core.model import Task, loads
from nebula.core.routing import prefix_key
from nebula.services.gateway.forward import forward
from nebula.services.gateway.state import GATEWAY
from nebula.services.gateway.validation import ENDPOINTS, Endpoint, check_request
from nebula.services.http.errors import ApiError, Handler, unavailable
from nebula.services.http.relay import relay

CLIENT_CLOSED = 499  # nginx's convention for "the client went away before the answer"


def _inference(endpoint: Endpoint) -> Handler:
    path = endpoint.path

    async def handle(request: web.Request) -> web.StreamResponse:
        st = request.app[GATEWAY]
        label, status = "unknown", 500
        started = time.monotonic()
        inflight = st.metrics.inflight(path)
        inflight.inc()
        try:
            raw = await request.read()
            body = loads(raw)
            model = check_request(endpoint, body)
            spec = st.view.models.get(model)
            if spec is None and not st.view.models_synced:
                # Started while the store is unreachable: "unknown model" would be a lie.
                raise unavailable("the gateway has not loaded the model list yet; retry shortly",
                                  code="models_not_loaded")
            if spec is None:
                raise ApiError(404, f"The model '{model}' does not exist or is not loaded", param="model",
                               code="model_not_found")
            label = model
            if spec.task is not endpoint.task:
                raise ApiError(400, f"model '{model}' serves task '{spec.task.value}'; "
                               f"/v1/{path} needs a '{endpoint.task.value}' model",
                               param="model", code="model_not_supported")
            # The key keeps a conversation on one replica's prefix cache (check_request proved body a dict).
            prefix = prefix_key(body) if endpoint.task is Task.GENERATE and isinstance(body, dict) else None
            respond = relay
            if path == "rerank" and isinstance(body, dict) and body.get("return_documents") is False:
                respond = _rerank_without_documents
            resp = await forward(request, st, model, raw, prefix, respond)
            status = resp.status
            return resp
        except (ApiError, web.HTTPException) as e:
            status = e.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            raise
        finally:
            inflight.dec()
            st.metrics.requests(label, path, str(status)).inc()
            st.metrics.latency(label, path).observe(time.monotonic() - started)

    return handle


async def _rerank_without_documents(request: web.Request, upstream: aiohttp.ClientResponse
                                    ) -> web.StreamResponse:
    """Cohere/Jina `return_documents: false`, which vLLM does not implement: drop the echoed documents.

    The one response the gateway rewrites; rerank answers are small and never streamed.
    """
    if upstream.status != 200:
        return await relay(request, upstream)
    try:
        payload = await upstream.json(content_type=None)
    except TimeoutError:
        raise ApiError(504, "the model did not answer in time", code="timeout") from None
    except (ValueError, aiohttp.ClientError):
        raise ApiError(502, "the engine sent an invalid rerank response", code="upstream_error") from None
    if isinstance(payload, dict) and isinstance(payload.get("results"), list):
        for result in payload["results"]:
            if isinstance(result, dict):
                result.pop("document", None)
    return web.json_response(payload)


async def _list_models(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    phases = st.table.phases()
    data = [st.view.model_entry(spec, phases.get(name, Counter())) for name, spec in sorted(st.view.models.items())]
    return web.json_response({"object": "list", "data": data})


async def _get_model(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    name = request.match_info["name"]
    spec = st.view.models.get(name)
    if spec is None:
        raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return web.json_response(st.view.model_entry(spec, st.table.phases().get(name, Counter())))


def routes() -> list[web.RouteDef]:
    return [web.post(f"/v1/{e.path}", _inference(e)) for e in ENDPOINTS.values()] + [
        web.get("/v1/models", _list_models),
        web.get("/v1/models/{name}", _get_model),
    ]
