"""Hostile input to the parsers at the edges: any config data or environment parses or is a ConfigError, any
JSON body is a ModelSpec or a ValidationError; and admin writes are idempotent (the same load twice changes
nothing in the store, a different one is refused)."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import ENV_PREFIX, config_template, parse_config
from nebula.core.model import ModelSpec
from nebula.errors import ConfigError, ValidationError
from nebula.services.gateway.app import build_gateway_app
from tests.harness.gateway_server import GatewayServer

SRC = "/etc/nebula/nebula.toml"
FIELDS = [(section, key) for section, key, _, _ in config_template()]
SECTIONS = sorted({s for s, _ in FIELDS})

# Every value TOML can hold (datetimes included), and more: Python ints beyond 64 bits, NaN and infinities.
SCALARS = (st.integers() | st.integers(min_value=10**300, max_value=10**400) | st.floats() | st.booleans()
           | st.text(max_size=12) | st.datetimes() | st.dates() | st.times())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
TABLE = st.dictionaries(st.sampled_from([k for _, k in FIELDS]) | st.text(max_size=6), VALUES, max_size=4)
DATA = st.dictionaries(st.sampled_from([*SECTIONS, "router"]) | st.text(max_size=6), TABLE | VALUES, max_size=4)
ENV_TEXT = (st.text(max_size=20) | st.sampled_from(["NaN", "Infinity", "-1e999", "1" * 400, "[" * 5000,
                                                    '{"a": 1}', "[1, 2]", "null", "true", " ", ""]))
ENV = st.dictionaries(st.sampled_from([f"{ENV_PREFIX}{s}_{k}".upper() for s, k in FIELDS]), ENV_TEXT, max_size=3)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DATA, ENV)
def test_any_config_data_parses_or_is_a_config_error(data: dict[str, Any], env: dict[str, str]) -> None:
    try:
        parse_config(data, env, SRC)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith(SRC) and "\n" not in msg, msg


@pytest.mark.parametrize(("env", "where"), [
    ({"NEBULA_GATEWAY_UPSTREAM_TIMEOUT_S": "1" * 400}, "NEBULA_GATEWAY_UPSTREAM_TIMEOUT_S"),
    ({"NEBULA_GATEWAY_UPSTREAM_TIMEOUT_S": "NaN"}, "NEBULA_GATEWAY_UPSTREAM_TIMEOUT_S"),
    ({"NEBULA_GATEWAY_CONNECT_TIMEOUT_S": "-Infinity"}, "NEBULA_GATEWAY_CONNECT_TIMEOUT_S"),
    ({"NEBULA_ENGINE_EXTRA_ARGS": "[" * 5000}, "NEBULA_ENGINE_EXTRA_ARGS"),
    ({"NEBULA_GATEWAY_PORT": "[" * 5000}, "NEBULA_GATEWAY_PORT"),
])
def test_values_found_by_the_property_test_are_one_line_errors(env: dict[str, str], where: str) -> None:
    with pytest.raises(ConfigError, match=f"^{SRC}: {where}: "):
        parse_config({}, env, SRC)


def test_toml_datetimes_and_huge_numbers_in_the_file() -> None:
    with pytest.raises(ConfigError, match=f"^{SRC}: gateway.port: must be an integer"):
        parse_config({"gateway": {"port": datetime.date(2024, 1, 1)}}, {}, SRC)
    with pytest.raises(ConfigError, match=f"^{SRC}: gateway.upstream_timeout_s: must be a finite number"):
        parse_config({"gateway": {"upstream_timeout_s": 10**400}}, {}, SRC)


SPEC_FIELDS = ["name", "source", "task", "replicas", "gpus_per_replica", "gpu_memory_mib", "engine", "engine_args",
               "max_model_len", "revision", "labels"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=10)
PLAUSIBLE = st.fixed_dictionaries({}, optional={
    "name": st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True) | JSON,
    "source": st.sampled_from(["/models/x", "org/name", "hf://org/name", "modelscope://o/n", "", " ", "../x",
                               "hf://", "x" * 300]) | st.text(max_size=20) | JSON,
    "task": st.sampled_from(["generate", "embed", "rerank"]) | JSON,
    "replicas": st.integers(-2, 70) | JSON, "engine_args": st.lists(st.text(max_size=5), max_size=3) | JSON,
    "revision": st.text(max_size=10) | JSON, "labels": st.dictionaries(st.text(max_size=4), JSON, max_size=2),
    **{f: JSON for f in ("gpus_per_replica", "gpu_memory_mib", "engine", "max_model_len")},
})


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON | PLAUSIBLE)
def test_any_json_is_a_model_spec_or_a_validation_error(body: object) -> None:
    try:
        spec = ModelSpec.from_dict(body)
    except ValidationError:
        return
    assert ModelSpec.from_dict(spec.to_dict()) == spec  # what it accepts survives its own round trip


# --- idempotent admin writes ------------------------------------------------------------------------------

@pytest.fixture
async def admin() -> AsyncIterator[tuple[MemoryStore, aiohttp.ClientSession, GatewayServer]]:
    store = MemoryStore()
    token = "adm"
    cfg_hash = hashlib.sha256(token.encode()).hexdigest()
    from nebula.core.config import GatewayConfig

    server = GatewayServer(build_gateway_app(GatewayConfig(admin_key_hashes=(cfg_hash,), load_poll_s=0), store,
                                          CollectorRegistry()))
    await server.start_server()
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
    try:
        yield store, http, server
    finally:
        await http.close()
        await server.close()


SPEC = {"name": "q", "source": "/models/q", "replicas": 2, "labels": {"team": "a"}}


async def test_repeating_a_load_writes_nothing_and_a_conflicting_one_is_409(
        admin: tuple[MemoryStore, aiohttp.ClientSession, GatewayServer]) -> None:
    store, http, server = admin
    async with http.post(server.make_url("/v1/admin/models"), json=SPEC) as resp:
        assert resp.status == 200 and (await resp.json())["created"] is True
    kv = await store.get(keys.model_key("q"))
    assert kv is not None
    revision = store.revision
    # The same spec again, also spelled differently (defaults written out, keys reordered): no write at all.
    for same in (SPEC, {"labels": {"team": "a"}, "replicas": 2, "source": "/models/q", "name": "q",
                        "task": "generate", "engine_args": [], "engine": "vllm", "max_model_len": None}):
        for path in ("/v1/admin/models", "/v1/models/load"):
            async with http.post(server.make_url(path), json=same) as resp:
                assert resp.status == 200 and (await resp.json())["created"] is False
    again = await store.get(keys.model_key("q"))
    assert again is not None and again.mod_revision == kv.mod_revision and store.revision == revision
    # Scaling to the count it already has is no write either.
    async with http.patch(server.make_url("/v1/admin/models/q"), json={"replicas": 2}) as resp:
        assert resp.status == 200
    assert store.revision == revision
    for conflicting in ({**SPEC, "replicas": 3}, {**SPEC, "source": "/models/other"}, {**SPEC, "labels": {}}):
        async with http.post(server.make_url("/v1/admin/models"), json=conflicting) as resp:
            assert resp.status == 409
            assert (await resp.json())["error"]["code"] == "model_exists"
    assert store.revision == revision
