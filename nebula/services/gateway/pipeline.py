"""The gateway's one request pipeline, which both of its HTTP servers run: name the request -> authenticate
-> admit -> route -> handler.

The data-plane server (services/http/fastserver.py, through dataplane.admit_by_key) runs the first three from
a request's head, before its body is read; aiohttp (for a connection it took over, and every other path) runs
them in `pipeline_middleware`. Both call the same two steps, so a request gets the same id, the same
authentication and the same admission (the unlimited-key shortcut included) whichever server reads it:

  - `name`: the client's X-Request-ID when acceptable, else a new one; done first, so that a refusal names
    the request too;
  - `admit`: the key (401/403/503 otherwise), then one of its request slots (429 when its limits refuse).
    What it holds is given back through `Admitted.release`, once, however the request ends.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from nebula.core.apikeys import KeyRecord
from nebula.services.gateway.auth import API_KEY, Authenticator, Scope, SessionAuth, scope_of
from nebula.services.gateway.exchange import REQUEST_ID, REQUEST_ID_HEADER, new_request_id
from nebula.services.http.errors import Handler


class Admitted:
    """What the pipeline learned of a request, for its handler."""

    # A plain class with Final fields rather than a frozen dataclass: made per request on the compiled path
    # (relay.RelayStats says why).
    __slots__ = ("key", "release", "request_id")

    def __init__(self, request_id: str, key: KeyRecord | None, release: Callable[[], None] | None = None) -> None:
        self.request_id: Final = request_id
        # None while the gateway is open, on an open path, or for the console's open session.
        self.key: Final = key
        self.release: Final = release  # gives back the key's request slot; None when nothing is held


class RequestPipeline:
    """The steps before a route, shared by the gateway's two servers."""

    __slots__ = ("_auth", "_random_bits")

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth
        # A request id is a name, not a secret (it goes back to the client and into the logs): a generator
        # seeded from the OS when the worker starts makes one in 0.23 us, where a getrandom call per request
        # (secrets) took 0.57 us.
        self._random_bits = random.Random().getrandbits

    def name(self, headers: Mapping[str, str]) -> str:
        """The request's id (X-Request-ID)."""
        return new_request_id(headers.get(REQUEST_ID_HEADER), self._random_bits)

    def admit(self, request_id: str, path: str, headers: Mapping[str, str],
              session_key: Callable[[], KeyRecord | None] | None = None) -> Admitted:
        """Authenticate the request and take one of its key's slots; raises ApiError (401, 403, 429, 503).
        `session_key`: the console session's check, used instead of a key header when the request has none."""
        authorization, x_api_key = headers.get("Authorization"), headers.get("x-api-key")
        if session_key is not None and not authorization and not x_api_key:
            key = session_key()
        else:
            key = self._auth.authenticate(scope_of(path), authorization, x_api_key)
        return Admitted(request_id, key, self._auth.take_slot(key))


# The gateway app's pipeline, which its data-plane site runs too (app.gateway_site).
PIPELINE = web.AppKey("nebula_request_pipeline", RequestPipeline)


def pipeline_middleware(pipeline: RequestPipeline, session: SessionAuth | None = None) -> Middleware:
    """The pipeline on aiohttp: sits inside error_middleware, which shapes its errors. A limited key's slot is
    held until the handler returns, which for a streamed answer is when its last byte went out, and also when
    the client goes away (the handler is cancelled). With `session`, an admin path called with the console's
    cookie and no key header is the console's."""

    @web.middleware
    async def run(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request[REQUEST_ID] = pipeline.name(request.headers)
        cookie = request.cookies.get(session[0]) if session is not None else None
        session_key = None
        if session is not None and cookie and scope_of(request.path) is Scope.ADMIN:
            check, value = session[1], cookie
            session_key = lambda: check(request, value)  # noqa: E731 - the console's check, on this request
        admitted = pipeline.admit(rid, request.path, request.headers, session_key)
        if admitted.key is not None:
            request[API_KEY] = admitted.key
        try:
            return await handler(request)
        finally:
            if admitted.release is not None:
                admitted.release()

    return run
