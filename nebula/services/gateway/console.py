"""The web console under /ui/: its static files, sign-in, its live feed and the playground's chat.

Everything the console does to the cluster goes through the admin API the CLI uses (/v1/admin/...), which
accepts its session cookie (with the CSRF header on state changes) as an admin credential; see
console_session.py. The console keeps no state: a page shows what the admin API and the gateway's mirrors
say, and its feed (console_feed.py) pushes what changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath

from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula.core.apikeys import KeyRecord
from nebula.core.model import loads
from nebula.services.gateway import console_session as cs
from nebula.services.gateway.auth import CONSOLE_PREFIX, Scope, SessionAuth, request_key
from nebula.services.gateway.exchange import REQUEST_ID_HEADER, request_id
from nebula.services.gateway.gpu_live import GpuLive
from nebula.services.gateway.openai_api import Call, serve_inference
from nebula.services.gateway.state import GATEWAY
from nebula.services.gateway.validation import ENDPOINTS
from nebula.services.http.errors import ApiError
from nebula.services.http.reply import AiohttpReply

_STATIC_PACKAGE = "nebula.services.gateway"
_STATIC_DIR = "console_static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}


@dataclass
class ConsoleState:
    secret: bytes
    registry: CollectorRegistry
    secure: bool  # the gateway serves TLS: the cookie is marked Secure
    wall: Callable[[], float] = time.time  # sessions expire in wall-clock time (workers share it)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name -> (body, content type)
    gpus: GpuLive | None = None  # live GPU utilisation and temperature, from the agents (gpu_live.py)


CONSOLE = web.AppKey("console", ConsoleState)


def read_static() -> dict[str, tuple[bytes, str]]:
    """The console's files (package data), read once: a handful of small files, served from memory."""
    out = {}
    for entry in resources.files(_STATIC_PACKAGE).joinpath(_STATIC_DIR).iterdir():
        suffix = PurePosixPath(entry.name).suffix
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


def _api_error(e: cs.SessionError) -> ApiError:
    return ApiError(e.status, str(e), code=e.code)


def session_auth() -> SessionAuth:
    """For the request pipeline: the admin key behind a request's console cookie."""

    def check(request: web.Request, cookie: str) -> KeyRecord | None:
        con, auth = request.app[CONSOLE], request.app[GATEWAY].auth
        try:
            return cs.check(con.secret, cookie, con.wall(), request.method, request.headers.get(cs.CSRF_HEADER),
                            auth.by_id, auth.is_open)
        except cs.SessionError as e:
            raise _api_error(e) from None

    return cs.COOKIE, check


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The console's pages and answers: strict CSP, no framing, no caching (on_response_prepare)."""
    if request.path == CONSOLE_PREFIX or request.path.startswith(CONSOLE_PREFIX + "/"):
        for k, v in cs.SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)


async def _index(request: web.Request) -> web.StreamResponse:
    if request.path == CONSOLE_PREFIX:
        raise web.HTTPFound(CONSOLE_PREFIX + "/")
    return _file(request.app[CONSOLE], "index.html")


def _file(con: ConsoleState, name: str) -> web.Response:
    found = con.files.get(name)
    if found is None:
        raise ApiError(404, f"no console file '{name}'", code="not_found")
    return web.Response(body=found[0], content_type=found[1].split(";")[0], charset="utf-8"
                        if "charset" in found[1] else None)


async def _static(request: web.Request) -> web.StreamResponse:
    return _file(request.app[CONSOLE], request.match_info["name"])


def _session_response(con: ConsoleState, token: str, record: KeyRecord | None, renewed: bool) -> web.Response:
    """The session's CSRF token and expiry (the cookie itself is out of the script's reach), and the
    cookie when it is new."""
    session = cs.parse(con.secret, token, con.wall())
    response = web.json_response({"csrf": cs.csrf_token(con.secret, token), "expires": session.expires,
                                  "key": {"id": record.id, "name": record.name} if record else None})
    if renewed:
        a = cs.CookieAttributes(secure=con.secure)
        response.set_cookie(cs.COOKIE, token, path=a.path, max_age=a.max_age, httponly=a.httponly,
                            samesite=a.samesite, secure=a.secure)
    return response


async def _login(request: web.Request) -> web.Response:
    """{"key": "<admin key>"} -> a session cookie and the session's CSRF token. Refused like the admin API
    refuses the key: 401 unknown, 403 not an admin key."""
    con, auth = request.app[CONSOLE], request.app[GATEWAY].auth
    body = loads(await request.read())
    key = body.get("key") if isinstance(body, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise ApiError(400, "enter an admin API key", param="key", code="invalid_value")
    record = auth.authenticate(Scope.ADMIN, f"Bearer {key.strip()}")
    return _session_response(con, cs.issue(con.secret, record, con.wall()), record, renewed=True)


async def _logout(request: web.Request) -> web.Response:
    response = web.json_response({"signed_out": True})
    response.del_cookie(cs.COOKIE, path="/")
    return response


async def _session(request: web.Request) -> web.Response:
    """The signed-in session (reached only through the cookie check): its CSRF token, renewed past half its
    life, so an open console stays signed in while used."""
    con = request.app[CONSOLE]
    token = request.cookies.get(cs.COOKIE, "")
    if not token:  # an admin key in a header reached here: it has no session to describe
        raise ApiError(401, "sign in to the console with an admin key", code="session_invalid")
    record = request_key(request)
    session = cs.parse(con.secret, token, con.wall())
    renew = cs.should_renew(session, con.wall())
    if renew:  # same nonce: the page's CSRF token stays good
        token = cs.issue(con.secret, record, con.wall(), nonce=session.nonce)
    return _session_response(con, token, record, renewed=renew)


async def _chat(request: web.Request) -> web.StreamResponse:
    """The playground's chat: /v1/chat/completions as an inference client would call it, with the session's
    admin key. Only the body goes on: the console's cookie and CSRF header never reach an engine."""
    st = request.app[GATEWAY]
    rid = request_id(request)
    call = Call("/v1/chat/completions", {"Content-Type": "application/json", REQUEST_ID_HEADER: rid},
                await request.read(), request_key(request), rid)
    reply = AiohttpReply(request)
    await serve_inference(st, ENDPOINTS["chat/completions"], call, reply)
    return reply.answer()


def routes() -> list[web.RouteDef]:
    from nebula.services.gateway.console_feed import events
    from nebula.services.gateway.console_logs import model_logs
    return [
        web.get(CONSOLE_PREFIX, _index),
        web.get(CONSOLE_PREFIX + "/", _index),
        web.get(CONSOLE_PREFIX + "/static/{name}", _static),
        web.post(CONSOLE_PREFIX + "/login", _login),
        web.post(CONSOLE_PREFIX + "/logout", _logout),
        web.get(CONSOLE_PREFIX + "/api/session", _session),
        web.get(CONSOLE_PREFIX + "/api/events", events),
        web.get(CONSOLE_PREFIX + "/api/models/{name}/logs", model_logs),
        web.post(CONSOLE_PREFIX + "/api/chat", _chat),
    ]
