"""API keys (`/nebula/apikeys/<id>`, written by the gateway's admin API): scopes, allowed models, limits.

A key is a bearer token of 256 random bits, shown to its creator once; only the SHA-256 digest of the
token is stored. A plain hash is enough (no salt, pepper or slow KDF): those defend low-entropy passwords
against guessing, and nobody can guess through 2^256 tokens, so a stolen digest gives no way back to its
token. The gateway finds a key by the digest of the presented token (one hash, one dict lookup).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from nebula.core.model import expect_field, expect_number, validate_name
from nebula.errors import ValidationError

SECRET_PREFIX = "nbk_"
ID_RE: Final = re.compile(r"^[0-9a-f]{16}$")
DIGEST_RE: Final = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME: Final = 128
MAX_RPM: Final = 1_000_000
MAX_CONCURRENT: Final = 100_000
MAX_MODELS: Final = 1_000


class KeyScope(enum.StrEnum):
    """What a key opens: the OpenAI endpoints (inference), the admin API (admin), or both."""

    INFERENCE = "inference"
    ADMIN = "admin"


def digest(secret: str) -> str:
    """The stored form of a token: lowercase SHA-256 hex of its UTF-8 bytes (as `sha256sum` prints it)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def validate_key_id(value: object, field_name: str = "id") -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValidationError(field_name, "must be a key id: 16 lowercase hex digits")
    return value


def validate_digest(value: object, field_name: str = "digest") -> str:
    if not isinstance(value, str) or not DIGEST_RE.fullmatch(value):
        raise ValidationError(field_name, "must be a lowercase SHA-256 hex digest (64 characters)")
    return value


def _key_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise ValidationError("name", f"must be a non-empty string of at most {MAX_NAME} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValidationError("name", "must not contain control characters")
    return value


def _scopes(obj: Mapping[str, Any]) -> frozenset[KeyScope]:
    raw = expect_field(obj, "scopes", list, ["inference"])
    if not raw:
        raise ValidationError("scopes", "must name at least one scope (inference, admin)")
    try:
        return frozenset(KeyScope(s) for s in raw)
    except (ValueError, TypeError):
        raise ValidationError("scopes", "must be a list of 'inference' and/or 'admin'") from None


def _models(obj: Mapping[str, Any]) -> tuple[str, ...] | None:
    raw = expect_field(obj, "models", list, None)
    if raw is None:
        return None
    if not raw or len(raw) > MAX_MODELS:
        raise ValidationError("models", f"must list 1 to {MAX_MODELS} model names (omit it to allow every model)")
    return tuple(sorted({validate_name(m, "models") for m in raw}))


def _limit(obj: Mapping[str, Any], key: str, most: int) -> int | None:
    try:
        value = expect_field(obj, key, int, None)
    except ValidationError as e:
        raise ValidationError(f"limits.{key}", e.message) from None
    if value is not None and not 1 <= value <= most:
        raise ValidationError(f"limits.{key}", f"must be between 1 and {most} (omit it for no limit)")
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits, enforced by each gateway on its own traffic. None: no limit."""

    requests_per_minute: int | None = None
    max_concurrent: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.max_concurrent is None

    @staticmethod
    def from_dict(obj: object) -> KeyLimits:
        if obj is None:
            return KeyLimits()
        if not isinstance(obj, dict):
            raise ValidationError("limits", "must be an object")
        unknown = set(obj) - {"requests_per_minute", "max_concurrent"}
        if unknown:
            raise ValidationError("limits", f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        return KeyLimits(requests_per_minute=_limit(obj, "requests_per_minute", MAX_RPM),
                         max_concurrent=_limit(obj, "max_concurrent", MAX_CONCURRENT))

    def to_dict(self) -> dict[str, int | None]:
        return {"requests_per_minute": self.requests_per_minute, "max_concurrent": self.max_concurrent}


@dataclass(frozen=True)
class KeyRequest:
    """The body of POST /v1/admin/keys: what the new key may do (its token and id are made by the gateway)."""

    name: str
    scopes: frozenset[KeyScope] = frozenset({KeyScope.INFERENCE})
    models: tuple[str, ...] | None = None
    limits: KeyLimits = KeyLimits()

    @staticmethod
    def from_dict(obj: object) -> KeyRequest:
        if not isinstance(obj, dict):
            raise ValidationError("", "the key request must be a JSON object")
        unknown = set(obj) - {"name", "scopes", "models", "limits"}
        if unknown:
            raise ValidationError(sorted(map(str, unknown))[0], "unknown field (known: name, scopes, models, limits)")
        return KeyRequest(name=_key_name(expect_field(obj, "name", str)), scopes=_scopes(obj), models=_models(obj),
                          limits=KeyLimits.from_dict(obj.get("limits")))

    def record(self, key_id: str, key_digest: str, created: float) -> KeyRecord:
        return KeyRecord(id=key_id, name=self.name, digest=key_digest, scopes=self.scopes, models=self.models,
                         limits=self.limits, created=created)


@dataclass(frozen=True)
class KeyRecord:
    """A stored key. `models` None: every model; otherwise only those (others get 403)."""

    id: str
    name: str
    digest: str
    scopes: frozenset[KeyScope]
    models: tuple[str, ...] | None = None
    limits: KeyLimits = KeyLimits()
    created: float = 0.0

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    @staticmethod
    def from_dict(obj: object) -> KeyRecord:
        if not isinstance(obj, dict):
            raise ValidationError("", "key record must be a JSON object")
        created = expect_number(obj, "created", 0.0)
        return KeyRecord(id=validate_key_id(expect_field(obj, "id", str)),
                         name=_key_name(expect_field(obj, "name", str)),
                         digest=validate_digest(expect_field(obj, "digest", str)), scopes=_scopes(obj),
                         models=_models(obj), limits=KeyLimits.from_dict(obj.get("limits")), created=created)

    def public_dict(self) -> dict[str, Any]:
        """What the admin API shows: everything but the digest (not a secret, but nobody needs it)."""
        return {"id": self.id, "object": "api_key", "name": self.name, "scopes": sorted(s.value for s in self.scopes),
                "models": list(self.models) if self.models is not None else None,
                "limits": self.limits.to_dict(), "created": self.created}

    def to_dict(self) -> dict[str, Any]:
        d = self.public_dict()
        del d["object"]
        return d | {"digest": self.digest}
