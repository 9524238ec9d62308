"""GET /v1/responses/{id} (also ?stream=true&starting_after=n) and POST /v1/responses/{id}/cancel: relayed
from the one replica that holds the stored response (stored_responses.py), on either of the gateway's
servers. POST /v1/responses itself is an ordinary inference endpoint (openai_api.serve_inference).

These requests name no model in a body: the id's replica gives it, and the key's model restrictions apply
to it (a key limited to other models is told the response does not exist).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from nebula.core.response_ids import token_of
from nebula.services.gateway.auth import model_allowed, request_key
from nebula.services.gateway.exchange import REQUEST_ID_HEADER, Exchange, request_id
from nebula.services.gateway.forward import forward
from nebula.services.gateway.openai_api import CLIENT_CLOSED, Call
from nebula.services.gateway.state import GATEWAY, GatewayState
from nebula.services.gateway.stored_responses import not_found, stored_target
from nebula.services.http.errors import ApiError
from nebula.services.http.relay import forward_headers
from nebula.services.http.reply import AiohttpReply, Reply

log = logging.getLogger(__name__)

PREFIX = "/v1/responses/"
CANCEL = "/cancel"


def stored_request(method: str, path: str) -> tuple[str, bool] | None:
    """(response id, is a cancel) for GET /v1/responses/{id} or POST /v1/responses/{id}/cancel; else None.

    The id is one plain path segment, as aiohttp's {id} matches it; anything escaped or nested is left to
    aiohttp (which answers it, or 404s it).
    """
    if not path.startswith(PREFIX):
        return None
    rest = path[len(PREFIX):]
    cancel = method == "POST" and rest.endswith(CANCEL)
    if cancel:
        rest = rest[:-len(CANCEL)]
    elif method != "GET":
        return None
    if not rest or "/" in rest or "%" in rest:
        return None
    return rest, cancel


async def serve_stored(st: GatewayState, call: Call, rid: str, cancel: bool, reply: Reply) -> None:
    """Relay the holding replica's answer about the stored response `rid` (its cancel when `cancel`).

    Raises ApiError 404 for an id the gateway did not issue, one whose replica is gone, or one of a model
    the key may not use; 503 when that replica cannot be reached.
    """
    label = "responses/cancel" if cancel else "responses/retrieve"
    method = "POST" if cancel else "GET"
    status = 500
    started = time.monotonic()
    ex = Exchange(call.request_id, "unknown")
    inflight = st.metrics.inflight(label)
    inflight.inc()
    try:
        target = stored_target(st, rid, method)
        if not model_allowed(call.key, target.model):
            raise not_found(rid, "response_id")
        ex.model = target.model
        headers = forward_headers(call.headers, {REQUEST_ID_HEADER: ex.request_id})
        # The path and query go as sent: vLLM reads ?stream and ?starting_after itself. No body either way.
        await forward(reply, call.path_qs, st, ex, b"", headers, None, target=target)
        status = reply.status
    except ApiError as e:
        status = e.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_CLOSED
        raise
    finally:
        inflight.dec()
        elapsed = time.monotonic() - started
        st.metrics.requests(ex.model, label, str(status)).inc()
        st.metrics.latency(ex.model, label).observe(elapsed)
        access_log = st.cfg.access_log
        if access_log == "all" or (access_log == "errors" and status >= 500):
            log.log(logging.WARNING if status >= 500 else logging.INFO,
                    "%s /v1/responses/%s%s model=%s status=%d %.3fs replica=%s attempts=%d", method,
                    rid if token_of(rid) else "(not-an-id)", CANCEL if cancel else "", ex.model, status,
                    elapsed, ex.replica or "-", ex.attempts,
                    extra={**ex.log_fields(), "NEBULA_STATUS": status})


# --- through aiohttp (connections the data-plane server handed over) ---

def _route(cancel: bool) -> web.RouteDef:
    async def handle(request: web.Request) -> web.StreamResponse:
        reply = AiohttpReply(request)
        call = Call(request.path_qs, request.headers, await request.read(), request_key(request),
                    request_id(request))
        await serve_stored(request.app[GATEWAY], call, request.match_info["id"], cancel, reply)
        return reply.answer()

    return (web.post("/v1/responses/{id}/cancel", handle) if cancel
            else web.get("/v1/responses/{id}", handle))


def routes() -> list[web.RouteDef]:
    return [_route(cancel=False), _route(cancel=True)]
