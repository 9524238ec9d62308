"""The gateway's one request pipeline (name -> authenticate -> admit), which both of its servers run: the
id, the key, the unlimited-key shortcut and a limited key's slot, taken and given back."""

from __future__ import annotations

import re

import pytest

from nebula.core import records
from nebula.core.apikeys import KeyRecord, KeyRequest, digest
from nebula.services.gateway.auth import Authenticator
from nebula.services.gateway.pipeline import RequestPipeline
from nebula.services.http.errors import ApiError
from tests.harness.mirrors import mirrored

CHAT = "/v1/chat/completions"


def pipeline_with(*keys: tuple[str, dict[str, object]]) -> tuple[RequestPipeline, dict[str, KeyRecord]]:
    auth = Authenticator((), (), lambda: 100.0)
    auth.update_keys(mirrored(records.APIKEYS))
    made = {}
    for n, (token, limits) in enumerate(keys, 1):
        record = KeyRequest.from_dict({"name": token, "limits": limits}).record(f"{n:016x}", digest(token), 0)
        auth.created(record)
        made[token] = record
    return RequestPipeline(auth), made


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_request_is_named_by_its_client_when_the_id_is_acceptable() -> None:
    pipeline, _ = pipeline_with()
    assert pipeline.name({"X-Request-ID": "req-42"}) == "req-42"
    made = [pipeline.name(bad) for bad in ({"X-Request-ID": "a b\x00"}, {"X-Request-ID": "x" * 500}, {})]
    assert all(re.fullmatch("[0-9a-f]{32}", rid) for rid in made)  # a new id instead
    # Each pipeline (one per worker process) draws its own ids: two do not repeat each other's.
    other, _ = pipeline_with()
    assert len({pipeline.name({}) for _ in range(1000)} | {other.name({}) for _ in range(1000)}) == 2000


def test_an_unlimited_key_holds_nothing_and_an_open_path_needs_no_key() -> None:
    pipeline, made = pipeline_with(("free", {}))
    admitted = pipeline.admit("rid", CHAT, bearer("free"))
    assert (admitted.request_id, admitted.key, admitted.release) == ("rid", made["free"], None)
    assert pipeline.admit("rid", "/healthz", {}).key is None


def test_a_limited_keys_slot_is_held_until_released() -> None:
    pipeline, made = pipeline_with(("one", {"max_concurrent": 1}))
    first = pipeline.admit("a", CHAT, bearer("one"))
    assert first.key == made["one"] and first.release is not None
    with pytest.raises(ApiError) as refused:
        pipeline.admit("b", CHAT, bearer("one"))
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    first.release()
    second = pipeline.admit("c", CHAT, bearer("one"))
    assert second.release is not None


@pytest.mark.parametrize(("headers", "status"), [({}, 401), (bearer("nope"), 401)])
def test_no_key_or_an_unknown_one_is_refused(headers: dict[str, str], status: int) -> None:
    pipeline, _ = pipeline_with(("k", {}))
    with pytest.raises(ApiError) as refused:
        pipeline.admit("rid", CHAT, headers)
    assert refused.value.status == status


def test_the_console_session_stands_in_only_for_a_missing_key_header() -> None:
    pipeline, made = pipeline_with(("k", {}))
    assert pipeline.admit("rid", "/v1/admin/models", {}, session_key=lambda: None).key is None
    assert pipeline.admit("rid", CHAT, bearer("k"), session_key=lambda: None).key == made["k"]
