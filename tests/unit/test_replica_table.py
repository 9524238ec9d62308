"""The gateway's replica table: the mirrored instance records it routes on, the requests in flight it tracks,
the wait for a replica, and its pick on polled load and prefix (the policy itself: test_routing_pick.py)."""

from __future__ import annotations

import asyncio

from nebula.core import keys, records
from nebula.core.engine_load import EngineLoad
from nebula.core.model import InstanceStatus, Phase, dumps
from nebula.core.routing import LoadPolicy
from nebula.core.store import KeyValue
from nebula.services.cluster.mirror import MirrorState
from nebula.services.gateway.load import LoadBook
from nebula.services.gateway.replicas import ReplicaTable
from tests.harness.mirrors import mirrored
from tests.unit.routing_fixtures import status

# --- ReplicaTable ----------------------------------------------------------------------------------------

def kvs(*statuses: InstanceStatus, extra: dict[str, bytes] | None = None) -> MirrorState[InstanceStatus]:
    out = {keys.instance_key(s.instance): KeyValue(keys.instance_key(s.instance), dumps(s.to_dict()), 5, 1)
           for s in statuses}
    for k, v in (extra or {}).items():
        out[k] = KeyValue(k, v, 6, 1)
    return mirrored(records.INSTANCES, out)


def test_table_skips_invalid_records_and_routes_the_rest() -> None:
    table = ReplicaTable()
    table.update(kvs(status("m", port=9000), extra={keys.instance_key("bad"): b"{not json",
                                                    keys.instance_key("bad2"): b'{"phase": "nope"}'}))
    assert table.synced
    picked = table.pick("m")
    assert picked is not None and picked.endpoint == "http://127.0.0.1:9000"
    assert table.pick("other") is None


def test_table_tracks_inflight_and_prefers_idle_replica() -> None:
    table = ReplicaTable()
    table.update(kvs(status("m", port=9000), status("m:1", port=9001)))
    first = table.pick("m")
    assert first is not None
    with table.track(first):
        assert table.inflight(first.endpoint) == 1
        for _ in range(3):
            other = table.pick("m")
            assert other is not None and other.endpoint != first.endpoint
    assert table.inflight(first.endpoint) == 0


def test_replica_leaving_ready_gets_no_new_requests_but_keeps_its_count() -> None:
    table = ReplicaTable()
    a, b = status("m", port=9000), status("m:1", port=9001)
    table.update(kvs(a, b))
    replica_a = next(r for r in table.ready()["m"] if r.instance == "m")
    with table.track(replica_a):
        table.update(kvs(InstanceStatus(**{**a.__dict__, "phase": Phase.DRAINING}), b))
        assert {table.pick("m").endpoint for _ in range(4)} == {"http://127.0.0.1:9001"}  # type: ignore[union-attr]
        assert table.draining_inflight() == {"http://127.0.0.1:9000": 1}
    assert table.draining_inflight() == {}
    view = table.to_json(0.0)
    assert view["models"]["m"]["phases"] == {"draining": 1, "ready": 1}


async def test_wait_for_replica_wakes_on_update() -> None:
    table = ReplicaTable()
    table.update(mirrored(records.INSTANCES))
    waiter = asyncio.create_task(table.wait_for_replica("m", 5.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    table.update(kvs(status("m", Phase.STARTING)))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    table.update(kvs(status("m")))
    assert await asyncio.wait_for(waiter, 1.0)
    assert not await table.wait_for_replica("absent", 0.01)


def test_table_routes_on_polled_load_and_prefix() -> None:
    book = LoadBook(max_age_s=3.0)
    table = ReplicaTable(LoadPolicy(), book)
    table.update(kvs(status("m", port=9000), status("m:1", port=9001)))
    book.record("http://127.0.0.1:9000", EngineLoad(waiting=10), now=1.0)
    assert {table.pick("m").endpoint for _ in range(4)} == {"http://127.0.0.1:9001"}  # type: ignore[union-attr]
    homes = {table.pick("m", prefix=lambda: "conv").endpoint for _ in range(4)}  # type: ignore[union-attr]
    assert len(homes) == 1
    ready = table.to_json(2.5)["models"]["m"]["ready"]
    assert [r["load"] for r in ready] == [{"waiting": 10.0, "running": 0.0, "kv_cache_usage": 0.0, "age_s": 1.5},
                                          None]
    assert table.ready_endpoints() == {"http://127.0.0.1:9000", "http://127.0.0.1:9001"}
