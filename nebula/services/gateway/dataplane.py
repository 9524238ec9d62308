"""The gateway's routes on its data-plane server (services/http/fastserver.py): the OpenAI paths.

`admit_by_key` runs the gateway's request pipeline (pipeline.py: name, authenticate, admit), the steps that
pipeline_middleware runs on aiohttp, from a request's head (before its body is read: a body on its way is a
request in flight); the key's slot is held until the server releases it, however the request ends. What the
route answers is the same handler aiohttp's OpenAI routes call (openai_api.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from nebula.core.config import GatewayConfig
from nebula.services.gateway.audio_api import AUDIO_PATHS, serve_audio
from nebula.services.gateway.auth import OPEN_PATHS
from nebula.services.gateway.exchange import REQUEST_ID_HEADER
from nebula.services.gateway.openai_api import Call, model_entry, models_list, serve_inference
from nebula.services.gateway.pipeline import Admitted, RequestPipeline
from nebula.services.gateway.responses_api import serve_stored, stored_request
from nebula.services.gateway.state import GatewayState
from nebula.services.gateway.validation import ENDPOINTS, Endpoint
from nebula.services.http.admission import ConnectionLimits, derived_max_connections
from nebula.services.http.connection_reply import ConnectionReply
from nebula.services.http.fastrequest import Admit, FastRequest, Route, Router
from nebula.services.http.reply import send_json

_MODELS: Final = "/v1/models"
# Served on the connections kept over the cap (admission.py): the operator's health check and metrics.
RESERVE_PATHS = OPEN_PATHS
# request_timeout_s = 0: the engine's own limit (and a wake's hold) and this much more, for the answer to get out.
REQUEST_MARGIN_S: Final = 60.0


def connection_limits(cfg: GatewayConfig, open_files: int) -> ConnectionLimits:
    """The data-plane server's limits from the config; `open_files`: this process's descriptor limit, from
    which an unset max_connections is derived."""
    max_connections = cfg.max_connections or derived_max_connections(open_files)
    return ConnectionLimits(max_connections=max_connections, max_per_ip=cfg.max_connections_per_ip,
                            header_timeout_s=cfg.header_timeout_s, body_timeout_s=cfg.body_timeout_s,
                            write_timeout_s=cfg.write_timeout_s,
                            # A request for an elastic model may be held for wake_wait_s before its engine's time.
                            request_timeout_s=cfg.request_timeout_s or cfg.upstream_timeout_s + cfg.wake_wait_s
                            + REQUEST_MARGIN_S)


def admit_by_key(pipeline: RequestPipeline) -> Admit:
    """The request pipeline's steps before the route (pipeline.py), from the head alone, so a caller without a
    valid key, or over its limits, is refused before its body is read (429 for a key already at
    max_concurrent, even while its other request's body is still coming); the route finds the key and the id
    in the request's context, the server gives the slot back through `release`."""

    def admit(request: FastRequest) -> None:
        rid = pipeline.name(request.headers)
        request.extra_headers.append((REQUEST_ID_HEADER, rid))
        admitted = request.context = pipeline.admit(rid, request.path, request.headers)
        request.release = admitted.release

    return admit


def dataplane_router(st: GatewayState) -> Router:
    """The router of the gateway's data-plane server: POST to an OpenAI inference path, GET /v1/models and
    GET /v1/models/{name}, GET /v1/responses/{id} and its cancel; None for anything else, which aiohttp
    serves."""

    async def list_models(call: Call, reply: ConnectionReply) -> None:
        await send_json(reply, models_list(st, call.key))

    async def get_model(call: Call, reply: ConnectionReply) -> None:
        await send_json(reply, model_entry(st, call.key, call.path_qs.partition("?")[0][len(_MODELS) + 1:]))

    posts = {p: _inference(st, e) for e in ENDPOINTS.values() for p in e.paths} | {
        f"/v1/{p}": _audio(st, p) for p in AUDIO_PATHS}
    models_route, model_route = _admitted(list_models), _admitted(get_model)

    def route(method: str, path: str) -> Route | None:
        if path.startswith("/v1/responses/") and (found := stored_request(method, path)) is not None:
            return _stored(st, *found)  # a stored response's GET or cancel: rare, so its route is made per request
        if method == "POST":
            return posts.get(path)
        if method == "GET":
            if path == _MODELS:
                return models_route
            name = path[len(_MODELS) + 1:] if path.startswith(_MODELS + "/") else ""
            # A name as aiohttp's {name} matches it; anything escaped or nested goes to aiohttp.
            if name and "/" not in name and "%" not in name:
                return model_route
        return None

    return route


# The routes are made at module level rather than nested in dataplane_router: compiled code
# (scripts/compile_data_path.py) loses a closure's names two functions deep.


def _admitted(answer: Callable[[Call, ConnectionReply], Awaitable[None]]) -> Route:
    """A route that answers with `answer` the request admit_by_key admitted."""

    async def admitted_route(request: FastRequest, reply: ConnectionReply) -> None:
        admitted: Admitted = request.context  # the key's slot, if it has limits, was taken in admit
        call = Call(request.target, request.headers, request.body, admitted.key, admitted.request_id)
        await answer(call, reply)

    return admitted_route


def _inference(st: GatewayState, endpoint: Endpoint) -> Route:
    return _admitted(lambda call, reply: serve_inference(st, endpoint, call, reply))


def _audio(st: GatewayState, path: str) -> Route:
    return _admitted(lambda call, reply: serve_audio(st, path, call, reply))


def _stored(st: GatewayState, rid: str, cancel: bool) -> Route:
    return _admitted(lambda call, reply: serve_stored(st, call, rid, cancel, reply))
