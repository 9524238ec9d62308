"""The OpenAI-compatible endpoints: validate at the edge, then hand the original bytes to the router.

The body is parsed once to validate it and learn the model, but what goes on is the client's own bytes,
so fields the gateway does not know reach the engine exactly as sent.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from yarl import URL

from nebula.core.model import Task, loads
from nebula.core.routing import PREFIX_HEADER, prefix_key
from nebula.services.gateway.state import GATEWAY, GatewayState
from nebula.services.gateway.validation import ENDPOINTS, Endpoint, check_request
from nebula.services.http.errors import ApiError, Handler, unavailable
from nebula.services.http.relay import MODEL_HEADER, forward_headers, relay

CLIENT_CLOSED = 499  # nginx's convention for "the client went away before the answer"


def _inference(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        st = request.app[GATEWAY]
        label, status = "unknown", 500
        started = time.monotonic()
        st.metrics.inflight.labels(endpoint.path).inc()
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
                               f"/v1/{endpoint.path} needs a '{endpoint.task.value}' model",
                               param="model", code="model_not_supported")
            extra = {MODEL_HEADER: model}
            if endpoint.task is Task.GENERATE and isinstance(body, dict) and (prefix := prefix_key(body)):
                extra[PREFIX_HEADER] = prefix  # the router keeps a conversation on one replica's prefix cache
            if endpoint.path == "rerank" and isinstance(body, dict) and body.get("return_documents") is False:
                resp = await _forward_rerank_without_documents(request, st, raw, extra)
            else:
                resp = await _forward(request, st, raw, extra)
            status = resp.status
            return resp
        except (ApiError, web.HTTPException) as e:
            status = e.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            raise
        finally:
            st.metrics.inflight.labels(endpoint.path).dec()
            st.metrics.requests.labels(label, endpoint.path, str(status)).inc()
            st.metrics.latency.labels(label, endpoint.path).observe(time.monotonic() - started)

    return handle


async def _forward(request: web.Request, st: GatewayState, raw: bytes, extra: dict[str, str]
                   ) -> web.StreamResponse:
    async with await _post_upstream(request, st, raw, extra) as upstream:
        return await relay(request, upstream)


async def _forward_rerank_without_documents(request: web.Request, st: GatewayState, raw: bytes,
                                            extra: dict[str, str]) -> web.StreamResponse:
    """Cohere/Jina `return_documents: false`, which vLLM does not implement: drop the echoed documents.

    The one response the gateway rewrites; rerank answers are small and never streamed.
    """
    async with await _post_upstream(request, st, raw, extra) as upstream:
        if upstream.status != 200:
            return await relay(request, upstream)
        try:
            payload = await upstream.json(content_type=None)
        except (ValueError, aiohttp.ClientError):
            raise ApiError(502, "the engine sent an invalid rerank response", code="upstream_error") from None
    if isinstance(payload, dict) and isinstance(payload.get("results"), list):
        for result in payload["results"]:
            if isinstance(result, dict):
                result.pop("document", None)
    return web.json_response(payload)


async def _post_upstream(request: web.Request, st: GatewayState, raw: bytes, extra: dict[str, str]
                         ) -> aiohttp.ClientResponse:
    headers = forward_headers(request.headers, {**extra, "Content-Type": "application/json"})
    url = URL(st.cfg.router_url.rstrip("/") + request.path_qs, encoded=True)
    timeout = aiohttp.ClientTimeout(total=st.cfg.upstream_timeout_s, sock_connect=5.0)
    try:
        return await st.http().post(url, data=raw, headers=headers, timeout=timeout)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
        raise unavailable("the router is not reachable; retry shortly", code="router_unavailable") from None
    except TimeoutError:
        raise ApiError(504, "the model did not answer in time", code="timeout") from None
    except aiohttp.ClientError as e:
        raise ApiError(502, f"the router failed: {type(e).__name__}", code="upstream_error") from None


async def _list_models(request: web.Request) -> web.Response:
    view = request.app[GATEWAY].view
    data = [view.model_entry(spec) for _, spec in sorted(view.models.items())]
    return web.json_response({"object": "list", "data": data})


async def _get_model(request: web.Request) -> web.Response:
    view = request.app[GATEWAY].view
    name = request.match_info["name"]
    spec = view.models.get(name)
    if spec is None:
        raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return web.json_response(view.model_entry(spec))


def routes() -> list[web.RouteDef]:
    return [web.post(f"/v1/{e.path}", _inference(e)) for e in ENDPOINTS.values()] + [
        web.get("/v1/models", _list_models),
        web.get("/v1/models/{name}", _get_model),
    ]
