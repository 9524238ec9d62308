"""The web console's sessions, as pure functions of a secret, a key set and the time.

A session is a signed token in a cookie, not a record anywhere: the gateway's workers share the secret
(the supervisor hands it to each in its environment, see `console_secret`), so any worker can check a
cookie another issued, and nothing is stored in etcd. The token names the admin key it was opened with
(its id and a prefix of its digest) and its expiry; every request looks that key up in the live key set,
so revoking the key ends its sessions at once, and a re-created key with the same id does not inherit them.

CSRF: each session has a token derived from the cookie (an HMAC of it under the same secret), which the
console's script sends in a header on every request; a cross-site page can make the browser send the
cookie, never read the token. Browsers also refuse the SameSite=Strict cookie to cross-site requests:
two locks, either enough.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from nebula.core.apikeys import KeyRecord, KeyScope

COOKIE = "nebula_console"
CSRF_HEADER = "X-Nebula-CSRF"
SECRET_ENV = "NEBULA_CONSOLE_SECRET"
# Short: a forgotten open tab stops being a credential soon. Active use renews it (see `should_renew`).
SESSION_S = 30 * 60
# The key id a session opened while the gateway has no key at all (loopback only) names.
OPEN_GATEWAY = "-"
_DIGEST_PREFIX = 16
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Scripts, styles, images and connections from the gateway itself only; no inline script or style, no
# framing (clickjacking), no plugins, no <base> games, forms post only here.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SessionError(Exception):
    """Why a request's session is refused; `status` 401 (log in again) or 403 (CSRF)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Session:
    key_id: str
    digest_prefix: str
    expires: float
    nonce: str  # kept when the session is renewed, so its CSRF token stays the same


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, label: bytes, payload: str) -> bytes:
    return hmac.new(secret, label + payload.encode(), hashlib.sha256).digest()


def issue(secret: bytes, record: KeyRecord | None, now: float, lifetime_s: float = SESSION_S,
          nonce: str | None = None) -> str:
    """A session token for `record` (None: the gateway is open, no key exists) valid until now + lifetime;
    `nonce`: the session's it renews."""
    body = {"k": record.id if record else OPEN_GATEWAY, "d": record.digest[:_DIGEST_PREFIX] if record else "",
            "e": round(now + lifetime_s, 3), "n": nonce or secrets.token_hex(16)}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_b64(_mac(secret, b'session:', payload))}"


def csrf_token(secret: bytes, token: str) -> str:
    """The session's CSRF token: derived (from its key and nonce, so a renewed cookie keeps it), so no
    worker needs to remember it."""
    payload = token.partition(".")[0]
    try:
        body = json.loads(_unb64(payload))
        ident = f"{body['k']}:{body['n']}" if isinstance(body, dict) else payload
    except (binascii.Error, ValueError, UnicodeDecodeError, KeyError):
        ident = payload
    return _b64(_mac(secret, b"csrf:", str(ident)))[:32]


def parse(secret: bytes, token: str, now: float) -> Session:
    """The session `token` names; SessionError 401 when it is forged, damaged or expired."""
    payload, _, mac = token.partition(".")
    try:
        good = hmac.compare_digest(_unb64(mac), _mac(secret, b"session:", payload))
        body = json.loads(_unb64(payload)) if good else None
    except (binascii.Error, ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or not all(isinstance(body.get(f), str) for f in "kdn") \
            or not isinstance(body.get("e"), (int, float)):
        raise SessionError(401, "not signed in: your console session is not valid; sign in again", "session_invalid")
    if body["e"] <= now:
        raise SessionError(401, "your console session expired; sign in again", "session_expired")
    return Session(body["k"], body["d"], float(body["e"]), body["n"])


def check(secret: bytes, token: str, now: float, method: str, csrf: str | None,
          key_by_id: Callable[[str], KeyRecord | None], gateway_open: bool) -> KeyRecord | None:
    """The admin key behind a request's session (None: the gateway is open), or SessionError.

    401 for a bad or expired token, and for a key that is revoked, replaced or no longer admin; 403 for a
    state change (any method but GET/HEAD/OPTIONS) without the session's CSRF token.
    """
    session = parse(secret, token, now)
    if method.upper() not in _SAFE_METHODS and not (csrf and hmac.compare_digest(csrf, csrf_token(secret, token))):
        raise SessionError(403, f"missing or wrong {CSRF_HEADER} header: reload the console", "csrf_failed")
    if session.key_id == OPEN_GATEWAY:
        if gateway_open:
            return None
        raise SessionError(401, "the gateway has API keys now; sign in with an admin key", "session_revoked")
    record = key_by_id(session.key_id)
    if record is None or record.digest[:_DIGEST_PREFIX] != session.digest_prefix \
            or KeyScope.ADMIN not in record.scopes:
        raise SessionError(401, "the key this session was opened with is revoked; sign in again", "session_revoked")
    return record


def should_renew(session: Session, now: float, lifetime_s: float = SESSION_S) -> bool:
    """Past half its life: an active console gets a fresh cookie, an idle one lapses."""
    return session.expires - now < lifetime_s / 2


@dataclass(frozen=True)
class CookieAttributes:
    """The cookie's attributes: script cannot read it, no other site sends it, TLS-only behind TLS."""

    secure: bool
    max_age: int = SESSION_S
    httponly: bool = True
    samesite: str = "Strict"
    path: str = "/"


def console_secret(env: MutableMapping[str, str]) -> bytes:
    """The secret sessions are signed with: the supervisor's (taken out of the environment, so nothing this
    process starts inherits it) or, for a gateway on its own, a fresh one (sessions end on restart)."""
    given = env.pop(SECRET_ENV, "")
    try:
        secret = bytes.fromhex(given)
    except ValueError:
        secret = b""
    return secret if len(secret) >= 32 else os.urandom(32)


def new_console_secret() -> str:
    return secrets.token_hex(32)
