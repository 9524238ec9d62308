"""Every record kind decodes any input to a record or a ValidationError: nothing else, whatever is in etcd."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.core import keys, records
from nebula.core.apikeys import KeyRecord, KeyScope
from nebula.core.discovery import ServiceKind, ServiceRecord
from nebula.core.elastic import IdleAction, LoadReport, ModelLoad, ScaleState, ScalingPolicy, WakeRequest
from nebula.core.engine_logs import LogAccess
from nebula.core.lora import AdapterSpec
from nebula.core.model import Gpu, InstanceStatus, ModelSpec, NodeRecord, Phase, Placement, dumps
from nebula.core.pulls import PullIntent, PullPhase, PullStatus
from nebula.core.records import RecordKind
from nebula.core.rollout_records import DrainRecord, RolloutRecord, RolloutState, RolloutStatus
from nebula.core.status import ModelStatus
from nebula.errors import ValidationError

SPEC = ModelSpec(name="tiny", source="/models/tiny")
VALID: dict[str, tuple[RecordKind[Any], Any]] = {
    "model": (records.MODELS, SPEC),
    "node": (records.NODES, NodeRecord(name="node-a", address="10.0.0.1", port_min=18000, port_max=18019,
                                       gpus=(Gpu(0, "H200", 143771, 512),), labels={"zone": "a"})),
    "placement": (records.PLACEMENTS, Placement(instance="tiny:1", node="node-a", model=SPEC, port=18001,
                                                gpu_indices=(0, 1))),
    "instance": (records.INSTANCES, InstanceStatus(instance="tiny:1", model="tiny", node="node-a",
                                                   phase=Phase.READY, endpoint="http://10.0.0.1:18001",
                                                   restarts=2, progress=None, adapters=("sql", "tone"),
                                                   adapter_errors=(("big", "rank 16 > 8"),),
                                                   history=((Phase.DOWNLOADING, 10.0), (Phase.STARTING, 70.5)))),
    "apikey": (records.APIKEYS, KeyRecord(id="0123456789abcdef", name="ci", digest="a" * 64,
                                          scopes=frozenset({KeyScope.INFERENCE}), created=1.5)),
    "pull": (records.PULLS, PullIntent.new("node-a", "org/model", None, 2.0)),
    "pull-status": (records.PULL_STATUS, PullStatus(id="0123456789abcdef", node="node-a", source="hf://org/model",
                                                    phase=PullPhase.DOWNLOADING, progress=0.5)),
    "model-status": (records.MODEL_STATUS, ModelStatus(model="tiny", pending="no GPU", since=3.0)),
    "adapter": (records.ADAPTERS, AdapterSpec(name="sql", base="tiny", source="/adapters/sql", rank=8)),
    "elastic-model": (records.MODELS, ModelSpec(name="big", source="/models/big", scaling=ScalingPolicy(
        min_replicas=0, max_replicas=4, idle_unload_s=600.0, idle_action=IdleAction.SLEEP, sleep_level=2, priority=5,
        target_inflight=8.0))),
    "asleep": (records.PLACEMENTS, Placement(instance="tiny", node="node-a", model=SPEC, port=18000, sleep_level=1)),
    "scale": (records.SCALE, ScaleState(model="big", replicas=0, reason="idle for 600 s", since=4.0)),
    "load": (records.LOAD, LoadReport(reporter="node-a.4242", at=5.0, models={
        "tiny": ModelLoad(inflight=3, held=1, waiting=2, running=3, kv_cache=0.25, last_request=4.5)})),
    "wake": (records.WAKE, WakeRequest(model="big", at=6.0, by="node-a.4242")),
    "rollout": (records.ROLLOUTS, RolloutRecord(model="tiny", previous=SPEC, target=ModelSpec(
        name="tiny", source="/models/tiny", revision="v2", engine_args=("--enforce-eager",)), started=7.0, by="ops")),
    "rollout-status": (records.ROLLOUT_STATUS, RolloutStatus(model="tiny", state=RolloutState.ROLLED_BACK,
                                                             target="0123456789abcdef", replaced=1, total=2,
                                                             reason="new replica tiny:2 failed", surge="tiny:2",
                                                             surge_since=8.0, since=7.0, updated=9.0)),
    "drain": (records.DRAINS, DrainRecord(node="node-a", since=10.0, by="ops", force=True)),
    "service": (records.SERVICES, ServiceRecord(service=ServiceKind.GATEWAY, node="node-a", address="127.0.0.1:8000")),
    "log-access": (records.LOG_ACCESS, LogAccess(node="node-a", address="10.0.0.1:9400", token="t" * 43)),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**310)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def key_of(kind: RecordKind[Any], record: Any) -> str:
    return kind.key_of(record)


@pytest.mark.parametrize("name", sorted(VALID))
def test_a_valid_record_round_trips_under_its_own_key(name: str) -> None:
    kind, record = VALID[name]
    assert kind.decode(key_of(kind, record), dumps(record.to_dict())) == record


@pytest.mark.parametrize("name", sorted(VALID))
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(value=json_values)
def test_any_json_is_a_record_or_a_validation_error(name: str, value: Any) -> None:
    kind, _ = VALID[name]
    try:
        kind.parse(value)
    except ValidationError:
        pass


@pytest.mark.parametrize("name", sorted(VALID))
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_one_damaged_field_is_a_record_or_a_validation_error(name: str, data: st.DataObject) -> None:
    """Arbitrary JSON rarely gets past the first field; damage one field of a valid record instead (nested
    ones too: a placement's model, a node's GPU), so every field's check is reached."""
    kind, record = VALID[name]
    obj = record.to_dict()
    target = obj
    field = data.draw(st.sampled_from(sorted(obj)))
    if isinstance(obj[field], dict) and obj[field] and data.draw(st.booleans()):
        target = obj[field]
        field = data.draw(st.sampled_from(sorted(target)))
    elif isinstance(obj[field], list) and obj[field] and isinstance(obj[field][0], dict):
        target = obj[field][0]
        field = data.draw(st.sampled_from(sorted(target)))
    target[field] = data.draw(json_values)
    try:
        kind.decode(key_of(kind, record), json.dumps(obj).encode())
    except ValidationError:
        pass


@pytest.mark.parametrize("name", sorted(VALID))
@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_are_a_record_or_a_validation_error(name: str, raw: bytes) -> None:
    kind, record = VALID[name]
    try:
        kind.decode(key_of(kind, record), raw)
    except ValidationError:
        pass


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b"\xff\xfe", b"1e400", b""])
def test_hostile_encodings_are_validation_errors(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        records.MODELS.decode(keys.model_key("x"), raw)


@pytest.mark.parametrize("instance", ["../../tmp/x", "tiny/../x", "tiny:01", "tiny:-1", "other:1", "tiny:1\n",
                                      "Tiny", "", "tiny:", ":1", "tiny:1:2"])
def test_a_placement_names_a_plain_instance_of_its_model(instance: str) -> None:
    _, placement = VALID["placement"]
    obj = placement.to_dict() | {"instance": instance}
    with pytest.raises(ValidationError):
        Placement.from_dict(obj)


@pytest.mark.parametrize("field, value", [("created", 10**400), ("created", float("inf")), ("created", "1"),
                                          ("scopes", ["root"]), ("digest", "x"), ("id", "../k")])
def test_an_api_key_record_refuses_impossible_values(field: str, value: object) -> None:
    _, key = VALID["apikey"]
    with pytest.raises(ValidationError):
        KeyRecord.from_dict(key.to_dict() | {field: value})


def test_a_record_under_another_records_key_is_refused() -> None:
    kind, spec = VALID["model"]
    with pytest.raises(ValidationError, match="names itself"):
        kind.decode(keys.model_key("other"), dumps(spec.to_dict()))
    not_utf8 = keys.MODELS + b"\xfftiny".decode("utf-8", "surrogateescape")
    with pytest.raises(ValidationError):
        kind.decode(not_utf8, dumps(spec.to_dict()))


def test_a_rollout_record_names_its_own_model_in_both_specs() -> None:
    _, record = VALID["rollout"]
    other = record.to_dict() | {"previous": ModelSpec(name="other", source="/m").to_dict()}
    with pytest.raises(ValidationError, match="must name 'tiny'"):
        RolloutRecord.from_dict(other)
    with pytest.raises(ValidationError, match="state"):
        RolloutStatus.from_dict(VALID["rollout-status"][1].to_dict() | {"state": "exploded"})
