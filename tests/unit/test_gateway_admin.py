"""The gateway's admin API over loopback (load, unload, scale, the model and node lists, a store outage) and
the scopes of the configured keys: admin, inference, and nothing open once any key exists (stored keys and
their limits: test_gateway_keys_*.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.model import Gpu, ModelSpec, NodeRecord, dumps, loads
from nebula.core.store import Guard, Op
from nebula.services.gateway.state import GATEWAY
from tests.unit.fake_engine import until
from tests.unit.gateway_api_fixtures import (
    ADMIN_KEY,
    CHAT,
    USER_KEY,
    MakeStack,
    assert_openai_error,
    engine_fixture,  # noqa: F401 (the fixture engine, which make_stack takes)
    make_stack_fixture,  # noqa: F401 (the fixture make_stack)
    sha,
)

# --- admin API ---------------------------------------------------------------------------------------------

NEW = {"name": "q", "source": "Qwen/Qwen2.5-0.5B-Instruct", "replicas": 2}


async def stored_spec(store: MemoryStore, name: str) -> ModelSpec | None:
    kv = await store.get(keys.model_key(name))
    return ModelSpec.from_dict(loads(kv.value)) if kv else None


async def test_load_is_idempotent_and_conflicts_on_a_different_spec(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", "/v1/admin/models", NEW)
    assert status == 200 and body["created"] is True
    assert await stored_spec(s.store, "q") == ModelSpec.from_dict(NEW)
    status, _, body = await s.call("POST", "/v1/admin/models", NEW)
    assert status == 200 and body["created"] is False
    status, _, body = await s.call("POST", "/v1/models/load", {**NEW, "source": "other/repo"})
    assert status == 409
    assert_openai_error(body, 409, "model_exists")
    assert await stored_spec(s.store, "q") == ModelSpec.from_dict(NEW)


async def test_load_alias_creates(make_stack: MakeStack) -> None:
    s = await make_stack()
    spec = {"name": "z", "source": "org/z", "task": "embed"}
    status, _, body = await s.call("POST", "/v1/models/load", spec)
    assert status == 200 and body["created"] is True
    await until(lambda: "z" in s.gateway.app[GATEWAY].view.models)


@pytest.mark.parametrize(("spec", "param"), [
    ({**NEW, "replicas": 0}, "replicas"),
    ({**NEW, "name": "Bad Name"}, "name"),
    ({"name": "q"}, "source"),
    ({**NEW, "task": "dance"}, "task"),
    ({**NEW, "engine_args": "--x"}, "engine_args"),
])
async def test_load_invalid_spec_is_400_naming_the_field(make_stack: MakeStack, spec: dict[str, Any],
                                                         param: str) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", "/v1/admin/models", spec)
    assert status == 400
    assert assert_openai_error(body, 400)["param"] == param
    assert await stored_spec(s.store, "q") is None


async def test_load_asking_for_more_gpus_than_any_node_has_is_400(make_stack: MakeStack) -> None:
    s = await make_stack()
    eight = {**NEW, "gpus_per_replica": 8}
    # No node yet: nodes may still join, so the load is taken (and stays pending until one fits).
    assert (await s.call("POST", "/v1/admin/models", {**eight, "name": "early"}))[0] == 200
    gpus = [Gpu(index=i, name="L4", memory_total_mib=23034, memory_used_mib=0) for i in range(4)]
    await s.store.put(keys.node_key("n1"), dumps(NodeRecord(name="n1", address="10.0.0.1", port_min=18000,
                                                            port_max=18100, gpus=tuple(gpus)).to_dict()))
    status, _, body = await s.call("POST", "/v1/admin/models", eight)
    assert status == 400
    err = assert_openai_error(body, 400, "insufficient_gpus")
    assert err["param"] == "gpus_per_replica" and "the most on one node is 4 (n1)" in err["message"]
    assert await stored_spec(s.store, "q") is None
    # Memory beyond every GPU is not refused: it stays pending with the scheduler's reason.
    assert (await s.call("POST", "/v1/admin/models", {**NEW, "gpus_per_replica": 4, "gpu_memory_mib": 40960}))[0] == 200


async def test_unload_then_404(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("DELETE", "/v1/admin/models/r")
    assert status == 200 and body == {"name": "r", "deleted": True}
    assert await stored_spec(s.store, "r") is None
    status, _, body = await s.call("DELETE", "/v1/admin/models/r")
    assert status == 404
    assert_openai_error(body, 404, "model_not_found")
    await until(lambda: "r" not in s.gateway.app[GATEWAY].view.models)
    status, _, _ = await s.call("POST", "/v1/rerank", {"model": "r", "query": "q", "documents": ["d"]})
    assert status == 404


async def test_scale_with_patch(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("PATCH", "/v1/admin/models/m", {"replicas": 3})
    assert status == 200 and body["model"]["replicas"] == 3
    spec = await stored_spec(s.store, "m")
    assert spec is not None and spec.replicas == 3 and spec.source == "org/m"
    status, _, body = await s.call("PATCH", "/v1/admin/models/m", {"replicas": 0})
    assert status == 400 and body["error"]["param"] == "replicas"
    status, _, body = await s.call("PATCH", "/v1/admin/models/m", {"replicas": 2, "source": "x/y"})
    assert status == 400
    status, _, body = await s.call("PATCH", "/v1/admin/models/nope", {"replicas": 2})
    assert status == 404


async def test_scale_retries_on_a_concurrent_write(make_stack: MakeStack) -> None:
    s = await make_stack()
    real_commit = s.store.commit
    calls = 0

    async def racing_commit(guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:  # another admin writes in between our read and our write
            await s.store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="org/m",
                                                                   labels={"x": "y"}).to_dict()))
        return await real_commit(guards, ops)

    s.store.commit = racing_commit  # type: ignore[method-assign]
    status, _, _ = await s.call("PATCH", "/v1/admin/models/m", {"replicas": 4})
    assert status == 200 and calls == 2
    spec = await stored_spec(s.store, "m")
    assert spec is not None and spec.replicas == 4 and spec.labels == {"x": "y"}


async def test_admin_lists_models_with_instances_and_nodes(make_stack: MakeStack) -> None:
    s = await make_stack()
    node = NodeRecord(name="n1", address="10.0.0.1", port_min=20000, port_max=20100)
    await s.store.put(keys.node_key("n1"), dumps(node.to_dict()))
    await s.store.put(keys.node_key("junk"), b"not json")
    status, _, body = await s.call("GET", "/v1/admin/models")
    assert status == 200
    m = next(x for x in body["data"] if x["name"] == "m")
    assert m["spec"]["source"] == "org/m" and m["ready"] == 1
    assert [(i["instance"], i["phase"]) for i in m["instances"]] == [("m", "ready"), ("m:1", "starting")]
    assert m["instances"][1]["message"] == "loading" and m["instances"][0]["node"] == "n1"
    status, _, one = await s.call("GET", "/v1/admin/models/m")
    assert status == 200 and one == m
    status, _, _ = await s.call("GET", "/v1/admin/models/nope")
    assert status == 404
    status, _, nodes = await s.call("GET", "/v1/admin/nodes")
    assert status == 200 and nodes["data"] == [node.to_dict()]


async def test_store_outage_is_503_not_500(make_stack: MakeStack) -> None:
    s = await make_stack()
    s.store.set_reachable(False)
    try:
        status, headers, body = await s.call("GET", "/v1/admin/models")
        assert status == 503 and headers["Retry-After"]
        assert_openai_error(body, 503)
        # Inference keeps working from the gateway's last view.
        status, _, _ = await s.call("POST", "/v1/chat/completions", CHAT)
        assert status == 200
    finally:
        s.store.set_reachable(True)


# --- keys --------------------------------------------------------------------------------------------------

async def test_keys_scope_admin_and_inference(make_stack: MakeStack) -> None:
    s = await make_stack(admin_key_hashes=(sha(ADMIN_KEY),), api_key_hashes=(sha(USER_KEY),))
    cases = [
        ("GET", "/v1/models", None, 401), ("GET", "/v1/models", "wrong", 401),
        ("GET", "/v1/models", USER_KEY, 200), ("GET", "/v1/models", ADMIN_KEY, 200),
        ("POST", "/v1/chat/completions", None, 401), ("POST", "/v1/chat/completions", USER_KEY, 200),
        ("GET", "/v1/admin/models", None, 401), ("GET", "/v1/admin/models", USER_KEY, 403),
        ("GET", "/v1/admin/models", "wrong", 401), ("GET", "/v1/admin/models", ADMIN_KEY, 200),
        ("POST", "/v1/models/load", USER_KEY, 403), ("DELETE", "/v1/admin/models/m", USER_KEY, 403),
        ("GET", "/healthz", None, 200), ("GET", "/metrics", None, 200),
    ]
    for method, path, key, want in cases:
        body = CHAT if path == "/v1/chat/completions" else (NEW if path == "/v1/models/load" else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with s.http.request(method, s.url(path), json=body, headers=headers) as resp:
            assert resp.status == want, (method, path, key)
            if want in (401, 403):
                assert_openai_error(await resp.json(), want)
    assert await stored_spec(s.store, "m") is not None  # the refused DELETE did nothing


async def test_once_any_key_exists_nothing_is_open(make_stack: MakeStack) -> None:
    s = await make_stack(api_key_hashes=(sha(USER_KEY),))
    status, _, _ = await s.call("GET", "/v1/admin/models")
    assert status == 401
    status, _, _ = await s.call("GET", "/v1/admin/models", key=USER_KEY)
    assert status == 403
    status, _, _ = await s.call("GET", "/v1/models")
    assert status == 401
