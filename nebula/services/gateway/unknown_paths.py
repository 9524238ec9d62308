"""A request for a path the gateway does not serve under /v1/ gets a 404 that lists what it serves.

vLLM serves more under /v1/ than the gateway routes (and some of it, such as /v1/load_lora_adapter, is the
engine's own administration, never for clients), so a client that tries an engine path gets told, in its
error shape, which inference paths there are instead of a bare "Not Found".
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from nebula.services.gateway.auth import ADMIN_PREFIX
from nebula.services.http.errors import ApiError, Handler

_PREFIX = "/v1/"


def served_paths(app: web.Application) -> list[str]:
    """`METHOD /v1/path` for each client route of `app` (the admin API left out), in a stable order."""
    out = {f"{route.method} {route.resource.canonical}" for route in app.router.routes()
           if route.resource is not None and route.method not in ("HEAD", "*")
           and route.resource.canonical.startswith(_PREFIX)
           and not route.resource.canonical.startswith(ADMIN_PREFIX)}
    return sorted(out, key=lambda s: (s.split(" ", 1)[1], s))


def unknown_path_middleware() -> Middleware:
    """Turns aiohttp's 404 for an unknown /v1/ path into one naming the served paths (computed once, at
    the first such request: the routes are fixed by then)."""
    listing: list[str] = []

    @web.middleware
    async def name_served_paths(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            if not request.path.startswith(_PREFIX) or request.match_info.route.resource is not None:
                raise  # a route of ours answered 404 itself
            if not listing:
                listing.extend(served_paths(request.app))
            raise ApiError(404, f"{request.method} {request.path} is not served by this gateway; it serves "
                                f"{', '.join(listing)} (GET /openapi.json describes them)",
                           code="not_found") from None

    return name_served_paths
