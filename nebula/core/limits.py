"""Per-key request limits: requests per minute (a token bucket) and requests in flight. Pure: time comes
from an injected clock, so tests drive it by hand.

The bucket holds a minute's allowance (`requests_per_minute` tokens) and refills continuously, so a key
may burst up to its per-minute limit and then gets one request every 60/rpm seconds. The workers of one
gateway count together (`KeyLimiter` over shared memory: adapters/shared_limits.py); separate gateways keep
their own counts: behind N gateways a key's effective limit is up to N times its configured one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from nebula.core.apikeys import KeyLimits

Clock = Callable[[], float]


def refill(tokens: float, last: float, per_minute: int, now: float) -> tuple[float, float]:
    """A bucket of `per_minute` tokens, `tokens` at time `last`, as it is at `now`. A clock that steps back (it
    should not: callers pass a monotonic one) refills nothing."""
    if now <= last:
        return tokens, last
    return min(float(per_minute), tokens + (now - last) * per_minute / 60.0), now


def wait_for_token(tokens: float, per_minute: int) -> float:
    """Seconds until a bucket holding `tokens` has one (0.0: it has one now)."""
    return 0.0 if tokens >= 1.0 else (1.0 - tokens) / (per_minute / 60.0)


class TokenBucket:
    def __init__(self, per_minute: int, now: float) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, got {per_minute}")
        self.per_minute = per_minute
        self.tokens = float(per_minute)
        self.last = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one will be there (nothing taken)."""
        self.tokens, self.last = refill(self.tokens, self.last, self.per_minute, now)
        wait = wait_for_token(self.tokens, self.per_minute)
        if wait == 0.0:
            self.tokens -= 1.0
        return wait


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused and when to retry (whole seconds, at least 1, for Retry-After)."""

    reason: str  # "rate" or "concurrency"
    retry_after_s: int
    message: str


def concurrency_refusal(inflight: int, limits: KeyLimits) -> Refusal | None:
    """Refused while the key has its max_concurrent requests in flight. Checked first: a request refused for it
    must not spend a token of the per-minute allowance."""
    if limits.max_concurrent is not None and inflight >= limits.max_concurrent:
        return Refusal("concurrency", 1, f"this API key already has {inflight} requests in flight, its limit "
                       f"(max_concurrent {limits.max_concurrent}); retry when one has finished")
    return None


def rate_refusal(wait_s: float, limits: KeyLimits) -> Refusal:
    return Refusal("rate", max(1, math.ceil(wait_s)), f"this API key's limit of {limits.requests_per_minute} "
                   "requests per minute is used up; retry after the time in Retry-After")


class KeyLimiter(Protocol):
    """Admission for every key with limits: `admit` either holds a slot (given back with `release` when the
    response has ended) or returns a Refusal and holds nothing."""

    def admit(self, key_id: str, limits: KeyLimits) -> Refusal | None: ...

    def release(self, key_id: str) -> None: ...

    def inflight(self, key_id: str) -> int: ...

    def keep_only(self, key_ids: Iterable[str]) -> None:
        """Forget revoked keys (a request still in flight on one just releases nothing)."""


@dataclass
class _KeyState:
    limits: KeyLimits
    bucket: TokenBucket | None
    inflight: int = 0


class Limiter:
    """A KeyLimiter for one process (a gateway on its own)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key_id: str, limits: KeyLimits) -> _KeyState:
        st = self._keys.get(key_id)
        if st is None or st.limits != limits:
            rpm = limits.requests_per_minute
            bucket = TokenBucket(rpm, self._clock()) if rpm is not None else None
            st = _KeyState(limits, bucket, st.inflight if st is not None else 0)
            self._keys[key_id] = st
        return st

    def admit(self, key_id: str, limits: KeyLimits) -> Refusal | None:
        st = self._state(key_id, limits)
        if (refused := concurrency_refusal(st.inflight, limits)) is not None:
            return refused
        if st.bucket is not None:
            wait = st.bucket.take(self._clock())
            if wait > 0:
                return rate_refusal(wait, limits)
        st.inflight += 1
        return None

    def release(self, key_id: str) -> None:
        st = self._keys.get(key_id)
        if st is not None and st.inflight > 0:
            st.inflight -= 1

    def inflight(self, key_id: str) -> int:
        st = self._keys.get(key_id)
        return st.inflight if st is not None else 0

    def keep_only(self, key_ids: Iterable[str]) -> None:
        live = set(key_ids)
        for key_id in [k for k in self._keys if k not in live]:
            del self._keys[key_id]
