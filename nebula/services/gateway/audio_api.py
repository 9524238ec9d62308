"""Speech to text: POST /v1/audio/transcriptions and /v1/audio/translations, multipart uploads.

As for the JSON endpoints (openai_api.py): the key is checked from the request's head, before its body is
read (the request pipeline, pipeline.py, on either server), the body is
bounded by its own limit (gateway.max_upload_bytes: audio is larger than any JSON request), the form's
`model` picks a ready replica of a model loaded with task `transcribe`, and the client's bytes go to the
engine unchanged, with its own Content-Type (the boundary is in it). The answer (JSON, text, SRT, or SSE
with stream=true) is relayed byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from aiohttp import web

from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, Task
from nebula.errors import ValidationError
from nebula.services.gateway.audio_form import read_form
from nebula.services.gateway.auth import check_model_allowed, request_key
from nebula.services.gateway.exchange import REQUEST_ID_HEADER, Exchange, request_id
from nebula.services.gateway.forward import forward
from nebula.services.gateway.openai_api import CLIENT_CLOSED, Call
from nebula.services.gateway.state import GATEWAY, GatewayState
from nebula.services.http.errors import ApiError, unavailable
from nebula.services.http.fastrequest import BodyLimit
from nebula.services.http.relay import forward_headers
from nebula.services.http.reply import AiohttpReply, Reply

log = logging.getLogger(__name__)

AUDIO_PATHS = ("audio/transcriptions", "audio/translations")  # after /v1/
UPLOAD_SETTING = "gateway.max_upload_bytes"


def upload_limits(cfg: GatewayConfig) -> Mapping[str, BodyLimit]:
    """The data-plane server's body limits of the audio paths (the other paths keep max_body_bytes)."""
    return {f"/v1/{p}": BodyLimit(cfg.max_upload_bytes, UPLOAD_SETTING) for p in AUDIO_PATHS}


def transcribe_spec(st: GatewayState, model: str, path: str) -> ModelSpec:
    """The loaded model an audio request names; ApiError 404 (unknown), 400 (not a transcribe model), 503
    (the gateway has not read the model list yet)."""
    spec = st.view.models.get(model)
    if spec is None and not st.view.models_synced:
        raise unavailable("the gateway has not loaded the model list yet; retry shortly", code="models_not_loaded")
    if spec is None:
        raise ApiError(404, f"The model '{model}' does not exist or is not loaded", param="model",
                       code="model_not_found")
    if spec.task is not Task.TRANSCRIBE:
        raise ApiError(400, f"model '{model}' serves task '{spec.task.value}'; /v1/{path} needs a "
                       f"'{Task.TRANSCRIBE.value}' model", param="model", code="model_not_supported")
    return spec


async def serve_audio(st: GatewayState, path: str, call: Call, reply: Reply) -> None:
    """Route the upload in `call` (to /v1/`path`) by its form's model and relay the engine's answer to
    `reply`. Raises ApiError (or ValidationError) for what is answered before any byte of the answer."""
    status = 500
    started = time.monotonic()
    ex = Exchange(call.request_id, "unknown")
    span = None
    inflight = st.metrics.inflight(path)
    inflight.inc()
    try:
        content_type = call.headers.get("Content-Type")
        form = await read_form(content_type, call.body)
        # Before the lookup: a key restricted to other models learns nothing about which exist.
        check_model_allowed(call.key, form.model)
        spec = transcribe_spec(st, form.model, path)
        ex.model = form.model
        # The client's Content-Type as parsed (one value, with its boundary), whatever else it repeated.
        headers = forward_headers(call.headers, {"Content-Type": content_type or "",
                                                 REQUEST_ID_HEADER: ex.request_id})
        if st.tracer is not None:
            span = st.tracer.start(f"POST /v1/{path}", call.headers, headers,
                                   {"nebula.model": form.model, "nebula.request_id": ex.request_id})
        # No prefix affinity: an upload shares no prompt prefix with another.
        if spec.scaling is not None and st.waker is not None:  # elastic: held while it wakes (wake.py)
            await st.waker.serve(spec.name, f"/v1/{path}", False, call.headers, reply,
                                 lambda to: forward(to, call.path_qs, st, ex, call.body, headers, None))
        else:
            st.load.begin(spec.name)  # the model's in-flight count and last request (load_report.py)
            try:
                await forward(reply, call.path_qs, st, ex, call.body, headers, None)
            finally:
                st.load.end(spec.name)
        status = reply.status
    except ApiError as e:
        status = e.status
        raise
    except ValidationError:
        status = 400
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_CLOSED
        raise
    finally:
        inflight.dec()
        _observe(st, path, ex, started, status)
        if span is not None and st.tracer is not None:
            st.tracer.finish(span, status, ex.replica, ex.attempts)


def _observe(st: GatewayState, path: str, ex: Exchange, started: float, status: int) -> None:
    elapsed = time.monotonic() - started
    st.metrics.requests(ex.model, path, str(status)).inc()
    st.metrics.latency(ex.model, path).observe(elapsed)
    access_log = st.cfg.access_log
    if access_log == "all" or (access_log == "errors" and status >= 500):
        log.log(logging.WARNING if status >= 500 else logging.INFO,
                "POST /v1/%s model=%s status=%d %.3fs replica=%s attempts=%d", path, ex.model, status, elapsed,
                ex.replica or "-", ex.attempts, extra={**ex.log_fields(), "NEBULA_STATUS": status})


# --- through aiohttp (a chunked upload, or a connection the data-plane server handed over) ---------------

async def read_upload(request: web.Request, limit: int) -> bytes:
    """The request's body, up to `limit` bytes: 413 from its Content-Length before reading, or as soon as a
    chunked body passes the limit. (aiohttp's client_max_size is max_body_bytes, for the JSON paths.)"""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(declared, limit)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body ({size} bytes) is over the gateway's limit of {limit} bytes "
                    f"({UPLOAD_SETTING})", code="request_too_large")


def _route(path: str) -> web.RouteDef:
    async def handle(request: web.Request) -> web.StreamResponse:
        st = request.app[GATEWAY]
        body = await read_upload(request, st.cfg.max_upload_bytes)
        reply = AiohttpReply(request)
        call = Call(request.path_qs, request.headers, body, request_key(request), request_id(request))
        await serve_audio(st, path, call, reply)
        return reply.answer()

    return web.post(f"/v1/{path}", handle)


def routes() -> list[web.RouteDef]:
    return [_route(p) for p in AUDIO_PATHS]
