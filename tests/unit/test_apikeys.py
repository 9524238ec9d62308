"""API key records and per-key limits: pure logic, limits driven by a hand-moved clock (no sleeps)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nebula.core.apikeys import KeyLimits, KeyRecord, KeyRequest, KeyScope, digest
from nebula.core.limits import Limiter, TokenBucket
from nebula.errors import ValidationError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- records --------------------------------------------------------------------------------------------

def test_digest_is_what_sha256sum_prints() -> None:
    assert digest("nbk_abc") == hashlib.sha256(b"nbk_abc").hexdigest()


def test_request_defaults_and_record_round_trip() -> None:
    req = KeyRequest.from_dict({"name": "team a", "models": ["m2", "m1", "m1"],
                                "limits": {"requests_per_minute": 60}})
    assert req.scopes == frozenset({KeyScope.INFERENCE}) and req.models == ("m1", "m2")
    rec = req.record("0123456789abcdef", digest("t"), 12.5)
    assert KeyRecord.from_dict(rec.to_dict()) == rec
    public = rec.public_dict()
    assert "digest" not in public and public["scopes"] == ["inference"] and public["limits"] == {
        "requests_per_minute": 60, "max_concurrent": None}
    assert rec.allows_model("m1") and not rec.allows_model("m3")
    assert KeyRequest.from_dict({"name": "x"}).record("0" * 16, "a" * 64, 0).allows_model("anything")


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"), ({"name": ""}, "name"), ({"name": " "}, "name"), ({"name": "a\nb"}, "name"),
    ({"name": "x" * 129}, "name"), ({"name": "k", "scopes": []}, "scopes"),
    ({"name": "k", "scopes": ["root"]}, "scopes"), ({"name": "k", "scopes": "admin"}, "scopes"),
    ({"name": "k", "models": []}, "models"), ({"name": "k", "models": ["Bad Name"]}, "models"),
    ({"name": "k", "limits": {"requests_per_minute": 0}}, "limits.requests_per_minute"),
    ({"name": "k", "limits": {"max_concurrent": True}}, "limits.max_concurrent"),
    ({"name": "k", "limits": {"rpm": 1}}, "limits"), ({"name": "k", "limits": []}, "limits"),
    ({"name": "k", "secret": "mine"}, "secret"),
])
def test_invalid_requests_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        KeyRequest.from_dict(body)
    assert e.value.field == field


@pytest.mark.parametrize("bad", [
    {"id": "0123456789abcdef\n"}, {"id": "XYZ"}, {"digest": "a" * 63}, {"digest": "A" * 64}, {"scopes": ["x"]}])
def test_stored_records_are_validated(bad: dict[str, Any]) -> None:
    good = KeyRequest.from_dict({"name": "k"}).record("0123456789abcdef", "a" * 64, 1.0).to_dict()
    with pytest.raises(ValidationError):
        KeyRecord.from_dict(good | bad)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, st.fixed_dictionaries({}, optional={
    "name": JSON | st.text(), "scopes": JSON | st.lists(st.sampled_from(["inference", "admin", "x"])),
    "models": JSON | st.lists(st.text(max_size=5)), "limits": JSON | st.fixed_dictionaries({}, optional={
        "requests_per_minute": JSON, "max_concurrent": JSON})})))
def test_any_key_request_parses_or_is_a_validation_error(body: object) -> None:
    try:
        KeyRequest.from_dict(body)
    except ValidationError:
        pass


# --- limits ---------------------------------------------------------------------------------------------

def test_token_bucket_bursts_a_minute_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(per_minute=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(20.0)  # one token every 60/3 s
    assert bucket.take(15.0) == pytest.approx(5.0)
    assert bucket.take(20.0) == 0.0
    assert bucket.take(1000.0) == 0.0 and bucket.tokens == 2.0  # refills up to a minute's worth, no more
    assert bucket.take(999.0) == 0.0  # a clock stepping back refills nothing and breaks nothing


def test_rate_limit_refuses_with_retry_after_and_recovers() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    limits = KeyLimits(requests_per_minute=2)
    assert limiter.admit("k", limits) is None
    limiter.release("k")
    assert limiter.admit("k", limits) is None
    limiter.release("k")
    refusal = limiter.admit("k", limits)
    assert refusal is not None and refusal.reason == "rate" and refusal.retry_after_s == 30
    clock.now += 29.5
    refusal = limiter.admit("k", limits)
    assert refusal is not None and refusal.retry_after_s == 1  # never 0: Retry-After is whole seconds
    clock.now += 0.5
    assert limiter.admit("k", limits) is None
    assert limiter.admit("other", limits) is None  # per key


def test_concurrency_limit_holds_slots_until_released() -> None:
    limiter = Limiter(Clock())
    limits = KeyLimits(max_concurrent=2, requests_per_minute=3)
    assert limiter.admit("k", limits) is None and limiter.admit("k", limits) is None
    refusal = limiter.admit("k", limits)
    assert refusal is not None and refusal.reason == "concurrency" and refusal.retry_after_s == 1
    limiter.release("k")
    assert limiter.inflight("k") == 1
    # The refused request spent no token: the third of three per minute is still there.
    assert limiter.admit("k", limits) is None
    limiter.release("k")
    limiter.release("k")
    refusal = limiter.admit("k", limits)
    assert refusal is not None and refusal.reason == "rate"
    assert limiter.inflight("k") == 0  # a rate refusal holds no slot


def test_revoked_keys_are_forgotten_and_late_releases_are_harmless() -> None:
    limiter = Limiter(Clock())
    limits = KeyLimits(max_concurrent=1)
    assert limiter.admit("gone", limits) is None
    limiter.keep_only(["other"])
    limiter.release("gone")
    assert limiter.inflight("gone") == 0
    limiter.release("never-seen")


def test_changed_limits_keep_the_requests_in_flight() -> None:
    limiter = Limiter(Clock())
    assert limiter.admit("k", KeyLimits(max_concurrent=5)) is None
    refusal = limiter.admit("k", KeyLimits(max_concurrent=1))
    assert refusal is not None and refusal.reason == "concurrency"
