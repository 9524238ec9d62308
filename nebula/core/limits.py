"""Per-key request limits: requests per minute (a token bucket) and requests in flight. Pure: time comes
from an injected clock, so tests drive it by hand.

The bucket holds a minute's allowance (`requests_per_minute` tokens) and refills continuously, so a key
may burst up to its per-minute limit and then gets one request every 60/rpm seconds. Each gateway keeps
its own counts: behind N gateways a key's effective limit is up to N times its configured one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nebula.core.apikeys import KeyLimits

Clock = Callable[[], float]


class TokenBucket:
    def __init__(self, per_minute: int, now: float) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, got {per_minute}")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.tokens = self.capacity
        self.last = now

    def _refill(self, now: float) -> None:
        # A clock that steps back (it should not: callers pass a monotonic one) refills nothing.
        if now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one will be there (nothing taken)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused and when to retry (whole seconds, at least 1, for Retry-After)."""

    reason: str  # "rate" or "concurrency"
    retry_after_s: int
    message: str


@dataclass
class _KeyState:
    limits: KeyLimits
    bucket: TokenBucket | None
    inflight: int = 0


class Limiter:
    """Admission for every key with limits. `admit` either holds a slot (give it back with `release`
    when the response has ended) or returns a Refusal and holds nothing."""

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
        # Concurrency first: a request refused for it must not spend a token of the per-minute allowance.
        if limits.max_concurrent is not None and st.inflight >= limits.max_concurrent:
            return Refusal("concurrency", 1, f"this API key already has {st.inflight} requests in flight, "
                           f"its limit (max_concurrent {limits.max_concurrent}); retry when one has finished")
        if st.bucket is not None:
            wait = st.bucket.take(self._clock())
            if wait > 0:
                return Refusal("rate", max(1, math.ceil(wait)),
                               f"this API key's limit of {limits.requests_per_minute} requests per minute is "
                               "used up; retry after the time in Retry-After")
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
        """Forget revoked keys (a request still in flight on one just releases nothing)."""
        live = set(key_ids)
        for key_id in [k for k in self._keys if k not in live]:
            del self._keys[key_id]
