"""The cluster's record kinds: where each lives in etcd, how it is decoded, and the key it must live under.

Every reader of cluster state decodes through `RecordKind.decode` (the services' typed mirrors and the
admin API's direct reads alike), so a record is validated one way everywhere: its JSON, its fields
(`from_dict` raises only `ValidationError`, whatever the input: tests/unit/test_records.py), and its key,
which must be the one the record names itself by. A record stored under another key (a copy, a
path-like name, a key that is not UTF-8) is refused, never trusted under the key's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nebula.core import keys
from nebula.core.apikeys import KeyRecord
from nebula.core.discovery import ServiceRecord
from nebula.core.elastic import LoadReport, ScaleState, WakeRequest
from nebula.core.engine_logs import LogAccess
from nebula.core.lora import AdapterSpec
from nebula.core.model import InstanceStatus, ModelSpec, NodeRecord, Placement, loads
from nebula.core.pulls import PullIntent, PullStatus
from nebula.core.rollout_records import DrainRecord, RolloutRecord, RolloutStatus
from nebula.core.status import ModelStatus
from nebula.errors import ValidationError

T = TypeVar("T")

PULL_ID_RE = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class RecordKind(Generic[T]):
    what: str
    """What one record is, for messages ("API key", "placement")."""
    prefix: str
    parse: Callable[[object], T]
    key_of: Callable[[T], str]

    def decode(self, key: str, value: bytes) -> T:
        """The record stored under `key`; raises only ValidationError, naming what is wrong."""
        record = self.parse(loads(value))
        expected = self.key_of(record)
        if expected != key:
            raise ValidationError("", f"this {self.what} names itself {expected!r}, not its key")
        return record


def _pull_key(p: PullIntent) -> str:
    if not PULL_ID_RE.fullmatch(p.id):
        raise ValidationError("id", "must be 16 hexadecimal digits")
    return keys.pull_key(p.node, p.id)


def _pull_status_key(s: PullStatus) -> str:
    if not PULL_ID_RE.fullmatch(s.id):
        raise ValidationError("id", "must be 16 hexadecimal digits")
    return keys.pull_status_key(s.node, s.id)


MODELS: RecordKind[ModelSpec] = RecordKind("model", keys.MODELS, ModelSpec.from_dict, lambda m: keys.model_key(m.name))
NODES: RecordKind[NodeRecord] = RecordKind("node record", keys.NODES, NodeRecord.from_dict,
                                           lambda n: keys.node_key(n.name))
PLACEMENTS: RecordKind[Placement] = RecordKind("placement", keys.PLACEMENTS, Placement.from_dict,
                                               lambda p: keys.placement_key(p.node, p.instance))
INSTANCES: RecordKind[InstanceStatus] = RecordKind("instance status", keys.INSTANCES, InstanceStatus.from_dict,
                                                   lambda s: keys.instance_key(s.instance))
APIKEYS: RecordKind[KeyRecord] = RecordKind("API key", keys.APIKEYS, KeyRecord.from_dict,
                                            lambda k: keys.apikey_key(k.id))
PULLS: RecordKind[PullIntent] = RecordKind("pull intent", keys.PULLS, PullIntent.from_dict, _pull_key)
PULL_STATUS: RecordKind[PullStatus] = RecordKind("pull status", keys.PULL_STATUS, PullStatus.from_dict,
                                                 _pull_status_key)
MODEL_STATUS: RecordKind[ModelStatus] = RecordKind("model status", keys.MODEL_STATUS, ModelStatus.from_dict,
                                                   lambda s: keys.model_status_key(s.model))
SERVICES: RecordKind[ServiceRecord] = RecordKind(
    "service record", keys.SERVICES, ServiceRecord.from_dict,
    lambda s: keys.service_key(s.service.value, s.node, s.address))

ADAPTERS: RecordKind[AdapterSpec] = RecordKind("LoRA adapter", keys.ADAPTERS, AdapterSpec.from_dict,
                                               lambda a: keys.adapter_key(a.name))

SCALE: RecordKind[ScaleState] = RecordKind("scale state", keys.SCALE, ScaleState.from_dict,
                                           lambda s: keys.scale_key(s.model))
LOAD: RecordKind[LoadReport] = RecordKind("load report", keys.LOAD, LoadReport.from_dict,
                                          lambda r: keys.load_key(r.reporter))
WAKE: RecordKind[WakeRequest] = RecordKind("wake request", keys.WAKE, WakeRequest.from_dict,
                                           lambda w: keys.wake_key(w.model))

ROLLOUTS: RecordKind[RolloutRecord] = RecordKind("rollout record", keys.ROLLOUTS, RolloutRecord.from_dict,
                                                 lambda r: keys.rollout_key(r.model))
ROLLOUT_STATUS: RecordKind[RolloutStatus] = RecordKind("rollout status", keys.ROLLOUT_STATUS, RolloutStatus.from_dict,
                                                       lambda s: keys.rollout_status_key(s.model))
DRAINS: RecordKind[DrainRecord] = RecordKind("drain record", keys.DRAINS, DrainRecord.from_dict,
                                             lambda d: keys.drain_key(d.node))
LOG_ACCESS: RecordKind[LogAccess] = RecordKind("log access record", keys.LOG_ACCESS, LogAccess.from_dict,
                                               lambda a: keys.log_access_key(a.node))

ALL: tuple[RecordKind[object], ...] = (MODELS, NODES, PLACEMENTS, INSTANCES, APIKEYS, PULLS,  # type: ignore[assignment]
                                       PULL_STATUS, MODEL_STATUS, SERVICES, ADAPTERS, SCALE, LOAD, WAKE, ROLLOUTS,
                                       ROLLOUT_STATUS, DRAINS, LOG_ACCESS)
