"""API keys: bearer tokens checked against configured SHA-256 digests.

Two scopes. Admin keys open everything; inference keys open the OpenAI endpoints only, never the admin
API. A scope with no configured keys is open (the config documents that the admin API should then stay
on loopback). Only digests are kept, and they are compared in constant time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from nebula.services.http.errors import ApiError, Handler

ADMIN_PREFIXES = ("/v1/admin/", "/v1/models/load")
OPEN_PATHS = frozenset({"/healthz", "/metrics"})


class Scope(enum.Enum):
    OPEN = "open"
    INFERENCE = "inference"
    ADMIN = "admin"


def scope_of(path: str) -> Scope:
    if path in OPEN_PATHS:
        return Scope.OPEN
    if path.startswith(ADMIN_PREFIXES) or path == "/v1/admin":
        return Scope.ADMIN
    return Scope.INFERENCE


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _matches(token_digest: str, hashes: Iterable[str]) -> bool:
    # Compare against every digest (no early exit) so timing does not tell which or how many matched.
    found = False
    for h in hashes:
        found |= hmac.compare_digest(token_digest, h)
    return found


class Authenticator:
    def __init__(self, admin_hashes: Iterable[str], api_hashes: Iterable[str]) -> None:
        self._admin = tuple(h.lower() for h in admin_hashes)
        self._api = tuple(h.lower() for h in api_hashes)

    def check(self, scope: Scope, authorization: str | None) -> None:
        """Raise ApiError 401 (no or unknown key) or 403 (an inference key on the admin API)."""
        if scope is Scope.OPEN:
            return
        needed = self._admin if scope is Scope.ADMIN else self._api
        if not needed:
            return
        token = _bearer(authorization)
        if token is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        d = digest(token)
        if _matches(d, self._admin):
            return
        if scope is Scope.INFERENCE and _matches(d, self._api):
            return
        if scope is Scope.ADMIN and _matches(d, self._api):
            raise ApiError(403, "this API key may not use the admin API", code="insufficient_scope")
        raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    kind, _, token = authorization.partition(" ")
    token = token.strip()
    return token if kind.lower() == "bearer" and token else None


def auth_middleware(auth: Authenticator) -> Middleware:
    """Checks the key before any handler runs; sits inside error_middleware, which shapes its errors."""

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        auth.check(scope_of(request.path), request.headers.get("Authorization"))
        return await handler(request)

    return check_key
