"""`nebula list` right after `nebula up`: a `ready` left by the node agent's previous run is not ready."""

from __future__ import annotations

from nebula.core import keys
from nebula.core.model import InstanceStatus, NodeRecord, Phase, dumps
from nebula.core.store import KeyValue
from nebula.services.gateway.records import instance_records, model_json

NODE = NodeRecord(name="node-a", address="127.0.0.1", port_min=18000, port_max=18010)


def kv(key: str, record: NodeRecord | InstanceStatus, lease: int) -> KeyValue:
    return KeyValue(key, dumps(record.to_dict()), mod_revision=5, version=1, lease=lease)


def ready(instance: str, lease: int) -> KeyValue:
    st = InstanceStatus(instance=instance, model="tiny", node="node-a", phase=Phase.READY,
                        endpoint="http://127.0.0.1:18000")
    return kv(keys.instance_key(instance), st, lease)


def test_a_ready_record_under_an_earlier_agents_lease_reads_as_starting() -> None:
    node = [kv(keys.node_key("node-a"), NODE, lease=0x20)]  # the agent that runs now
    instances = instance_records([ready("tiny", lease=0x10), ready("tiny:1", lease=0x20)], node)
    phases = {i.instance: i.phase for i in instances}
    assert phases == {"tiny": Phase.STARTING, "tiny:1": Phase.READY}
    assert "not yet confirmed by node-a's agent" in next(i.message for i in instances if i.instance == "tiny")
    assert model_json("tiny", None, instances)["ready"] == 1


def test_without_node_records_the_instances_are_taken_as_they_are() -> None:
    # A node whose record is gone (lost) keeps what its records say until their lease ends: `status` shows it lost.
    assert [i.phase for i in instance_records([ready("tiny", lease=0x10)])] == [Phase.READY]
