"""The gateway's routes on its data-plane server (services/http/fastserver.py): the OpenAI paths.

Together with `admit_by_key` each does here what aiohttp's middlewares do for the other paths: names the
request (X-Request-ID), checks its key and holds one of the key's request slots for as long as the
answer takes. What the route answers is the same handler aiohttp's OpenAI routes call (openai_api.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nebula.core.apikeys import KeyRecord
from nebula.services.gateway.auth import Authenticator, scope_of
from nebula.services.gateway.exchange import REQUEST_ID_HEADER, new_request_id
from nebula.services.gateway.openai_api import Call, model_entry, models_list, serve_inference
from nebula.services.gateway.state import GatewayState
from nebula.services.gateway.validation import ENDPOINTS, Endpoint
from nebula.services.http.fastserver import Admit, ConnectionReply, FastRequest, Route, Router
from nebula.services.http.reply import send_json

_MODELS = "/v1/models"


@dataclass(frozen=True, slots=True)
class Admitted:
    request_id: str
    key: KeyRecord | None  # None while the gateway is open


def admit_by_key(auth: Authenticator) -> Admit:
    """Names the request (X-Request-ID) and checks its key from the head alone, so a caller without a valid
    key is refused before its body is read; the route finds both in the request's context."""

    def admit(request: FastRequest) -> None:
        rid = new_request_id(request.headers.get(REQUEST_ID_HEADER))
        request.extra_headers.append((REQUEST_ID_HEADER, rid))
        request.context = Admitted(rid, auth.authenticate(scope_of(request.path), request.headers.get("Authorization")))

    return admit


def dataplane_router(st: GatewayState) -> Router:
    """The router of the gateway's data-plane server: POST to an OpenAI inference path, GET /v1/models and
    GET /v1/models/{name}; None for anything else, which aiohttp serves."""

    def guarded(answer: Callable[[Call, ConnectionReply], Awaitable[None]]) -> Route:
        async def route(request: FastRequest, reply: ConnectionReply) -> None:
            admitted: Admitted = request.context
            key = admitted.key
            call = Call(request.target, request.headers, request.body, key, admitted.request_id)
            if key is None or key.limits.unlimited:
                await answer(call, reply)  # the common case, without a context manager per request
                return
            with st.auth.admitted(key):
                await answer(call, reply)

        return route

    def inference(endpoint: Endpoint) -> Route:
        return guarded(lambda call, reply: serve_inference(st, endpoint, call, reply))

    async def list_models(call: Call, reply: ConnectionReply) -> None:
        await send_json(reply, models_list(st, call.key))

    async def get_model(call: Call, reply: ConnectionReply) -> None:
        await send_json(reply, model_entry(st, call.key, call.path_qs.partition("?")[0][len(_MODELS) + 1:]))

    posts = {f"/v1/{e.path}": inference(e) for e in ENDPOINTS.values()}
    models_route, model_route = guarded(list_models), guarded(get_model)

    def route(method: str, path: str) -> Route | None:
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
