"""API keys at the gateway: who may call what, and how much.

Keys come from two places, used together: SHA-256 digests in the config (`gateway.admin_key_hashes`,
`gateway.api_key_hashes`, and the bootstrap admin key's digest file written at install), and records in
etcd under /nebula/apikeys/ (created and revoked through the admin API), mirrored here by a watch. While
no key exists anywhere the gateway is open (meant for loopback); once one exists (a damaged record in etcd
counts), every path but /healthz and /metrics needs a key. Scopes: inference keys open the OpenAI
endpoints, admin keys the admin API; a key with the wrong scope gets 403, an unknown one 401.

Per request this is one SHA-256 and one dict lookup by digest. The lookup need not be constant-time: at
worst its timing tells an attacker something about stored *digests*, and a digest is useless without a
token that hashes to it (a preimage of SHA-256); the token itself is never compared with anything.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from aiohttp import web

from nebula.core.apikeys import DIGEST_RE, KeyRecord, KeyScope, digest
from nebula.core.limits import Clock, KeyLimiter, Limiter
from nebula.errors import ConfigError
from nebula.services.cluster.mirror import MirrorState
from nebula.services.http.errors import ApiError, unavailable

log = logging.getLogger(__name__)

# Whole paths or a prefix ending in '/': "/v1/models/load" as a prefix also caught GET /v1/models/loader,
# a model named "loader", and made it admin-only.
ADMIN_PREFIX: Final = "/v1/admin/"
ADMIN_PATHS: Final = frozenset({"/v1/admin", "/v1/models/load"})
OPEN_PATHS: Final = frozenset({"/healthz", "/metrics"})
ANY_KEY_PATHS: Final = frozenset({"/openapi.json"})
# The web console (console.py): its page, script and login are open (they hold nothing secret; the login
# checks the key itself), its API is the admin's, with the session cookie as the credential.
CONSOLE_PREFIX: Final = "/ui"
CONSOLE_API_PREFIX: Final = "/ui/api/"

# The key a request was authenticated with (absent while the gateway is open).
API_KEY: Final = web.RequestKey("nebula_api_key", KeyRecord)


class Scope(enum.Enum):
    OPEN = "open"
    ANY_KEY = "any_key"
    INFERENCE = "inference"
    ADMIN = "admin"


def scope_of(path: str) -> Scope:
    if path in OPEN_PATHS:
        return Scope.OPEN
    if path.startswith(CONSOLE_API_PREFIX):
        return Scope.ADMIN
    if path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/"):
        return Scope.OPEN
    if path.startswith(ADMIN_PREFIX) or path in ADMIN_PATHS:
        return Scope.ADMIN
    if path in ANY_KEY_PATHS:
        return Scope.ANY_KEY
    return Scope.INFERENCE


def _config_records(admin_hashes: Iterable[str], api_hashes: Iterable[str]) -> dict[str, KeyRecord]:
    # Config admin keys open everything, as they always did; their ids cannot collide with stored ones.
    out: dict[str, KeyRecord] = {}
    for h in api_hashes:
        h = h.lower()
        out[h] = KeyRecord(id=f"config:{h[:12]}", name="config api key", digest=h,
                           scopes=frozenset({KeyScope.INFERENCE}))
    for h in admin_hashes:
        h = h.lower()
        out[h] = KeyRecord(id=f"config:{h[:12]}", name="config admin key", digest=h,
                           scopes=frozenset({KeyScope.INFERENCE, KeyScope.ADMIN}))
    return out


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    def __init__(self, admin_hashes: Iterable[str], api_hashes: Iterable[str], clock: Clock,
                 limiter: KeyLimiter | None = None) -> None:
        self._config = _config_records(admin_hashes, api_hashes)
        self._stored: dict[str, KeyRecord] = {}  # id -> record, as the mirror of /nebula/apikeys/ last saw it
        # This gateway's own writes, applied before its mirror sees them, so a created key works and a
        # revoked one stops at once here (other gateways follow within their watch's delay).
        self._created: dict[str, KeyRecord] = {}
        self._revoked: set[str] = set()
        # Ids the mirror has listed at some time: a write it has already seen (the watch can beat the handler
        # that made it) must not be applied again, or a key deleted since would live on here.
        self._seen: set[str] = set()
        self._by_digest: dict[str, KeyRecord] = dict(self._config)
        self._any_stored = False  # a record exists, valid or not: a damaged key record must not open the gateway
        self.synced = False  # the mirror delivered its first listing: "no such key" is then the truth
        # Per-key limits: this process's own counts, or those it shares with the gateway's other workers.
        self.limiter: KeyLimiter = limiter if limiter is not None else Limiter(clock)

    # --- the key set -------------------------------------------------------------------------------------

    def update_keys(self, state: MirrorState[KeyRecord]) -> None:
        """The API keys mirror's callback: every valid key record (refused ones are in `state.bad`)."""
        stored = {record.id: record for record in state.records.values()}
        self._stored = stored
        self._seen |= set(stored)
        self._any_stored = bool(state.records or state.bad)
        self._created = {i: r for i, r in self._created.items() if i not in stored}
        self._revoked &= set(stored)
        self.synced = True
        self._rebuild()

    def created(self, record: KeyRecord) -> None:
        if record.id in self._seen:
            return
        self._created[record.id] = record
        self._rebuild()

    def revoked(self, key_id: str) -> None:
        self._revoked.add(key_id)
        self._created.pop(key_id, None)
        self._rebuild()

    def _rebuild(self) -> None:
        live = [r for r in (self._stored | self._created).values() if r.id not in self._revoked]
        by_digest = {r.digest: r for r in live}
        by_digest.update(self._config)  # a config key wins: the config is the operator's last word
        self._by_digest = by_digest
        self.limiter.keep_only(r.id for r in live)

    @property
    def has_config_admin(self) -> bool:
        """An admin key from the config or the bootstrap digest file: the admin API can never be locked."""
        return any(KeyScope.ADMIN in r.scopes for r in self._config.values())

    @property
    def is_open(self) -> bool:
        """No key anywhere (and the stored ones are known): every request is let in."""
        return self.synced and not self._by_digest and not self._any_stored

    def by_id(self, key_id: str) -> KeyRecord | None:
        """The live key with this id (a console session's key, checked on each of its requests)."""
        return next((r for r in self._by_digest.values() if r.id == key_id), None)

    def config_keys(self) -> list[KeyRecord]:
        return sorted(self._config.values(), key=lambda r: r.id)

    # --- per request -------------------------------------------------------------------------------------

    def take_slot(self, record: KeyRecord | None) -> Callable[[], None] | None:
        """One of the key's request slots: what gives it back, or None when the key has no limits (nothing is
        held); raises ApiError 429 when its limits refuse."""
        if record is None or record.limits.unlimited:
            return None
        refusal = self.limiter.admit(record.id, record.limits)
        if refusal is not None:
            raise ApiError(429, refusal.message, code=f"{refusal.reason}_limit_exceeded",
                           headers={"Retry-After": str(refusal.retry_after_s)})
        key_id, limiter = record.id, self.limiter
        return lambda: limiter.release(key_id)

    def authenticate(self, scope: Scope, authorization: str | None, x_api_key: str | None = None
                     ) -> KeyRecord | None:
        """The key's record, or None while the gateway is open. The key is read from `Authorization: Bearer`
        or, when that is absent, from `x-api-key` (what Anthropic's SDK and Claude Code send). Raises ApiError
        401 (no or unknown key), 403 (the key's scopes do not cover the path), 503 (stored keys not loaded
        yet: fail closed)."""
        if scope is Scope.OPEN:
            return None
        token = _bearer(authorization) if authorization else (x_api_key or "").strip() or None
        record = self._by_digest.get(digest(token)) if token is not None else None
        if record is not None:
            if scope is Scope.ADMIN and KeyScope.ADMIN not in record.scopes:
                raise ApiError(403, "this API key may not use the admin API", code="insufficient_scope")
            if scope is Scope.INFERENCE and KeyScope.INFERENCE not in record.scopes:
                raise ApiError(403, "this API key is for the admin API only", code="insufficient_scope")
            return record
        if token is None and self._config:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
        if not self.synced:
            raise unavailable("the gateway has not loaded its API keys yet; retry shortly", code="keys_not_loaded")
        if not self._by_digest and not self._any_stored:
            return None
        if token is None:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
        raise _unauthorized("invalid API key")


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    kind, _, token = authorization.partition(" ")
    token = token.strip()
    return token if kind.lower() == "bearer" and token else None


# The web console's credential: (cookie name, check) where check(request, cookie value) returns the session's
# admin key (None while the gateway is open) or raises ApiError; see console.py.
SessionAuth = tuple[str, Callable[[web.Request, str], "KeyRecord | None"]]


# --- for the handlers -----------------------------------------------------------------------------------

def request_key(request: web.Request) -> KeyRecord | None:
    """The key `request` was authenticated with; None while the gateway is open (no keys anywhere)."""
    return request.get(API_KEY)


def model_allowed(record: KeyRecord | None, model: str) -> bool:
    return record is None or record.allows_model(model)


def check_model_allowed(record: KeyRecord | None, model: str) -> None:
    """403 in the OpenAI shape when the key is restricted to other models."""
    if not model_allowed(record, model):
        raise ApiError(403, f"this API key may not use the model '{model}'", param="model",
                       code="model_not_allowed")


# --- the bootstrap admin key ----------------------------------------------------------------------------

_DIGEST_FILE: Final = "gateway.admin_key_digest_file"


def read_digest_file(path: str) -> tuple[str, ...]:
    """Digests from a file like `sha256sum` writes (`<hex>  -`), one per line; '#' comments allowed.

    A missing file (or an empty path) is no keys; an unreadable or malformed one stops the gateway, since
    starting without a key the operator counted on could leave it open.
    """
    if not path:
        return ()
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(_DIGEST_FILE, f"{_DIGEST_FILE}: {path}: cannot read: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not DIGEST_RE.fullmatch(words[0].lower()):
            raise ConfigError(_DIGEST_FILE, f"{_DIGEST_FILE}: {path}:{n}: not a SHA-256 hex digest "
                              "(write one with `sha256sum`)")
        out.append(words[0].lower())
    return tuple(out)
