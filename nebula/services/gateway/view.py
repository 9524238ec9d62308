"""The gateway's mirror of /nebula/models/, for request checks and GET /v1/models (instances: replicas.py).

Inference requests are checked against this mirror (no store round trip per request, and it keeps
answering from its last view while etcd is down). The admin API reads the store itself, so it sees
its own writes at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from nebula.core import keys
from nebula.core.model import ModelSpec, Phase, loads
from nebula.core.store import KeyValue
from nebula.errors import ValidationError

log = logging.getLogger(__name__)


class ClusterView:
    def __init__(self) -> None:
        self.models: dict[str, ModelSpec] = {}
        self._warned: set[tuple[str, int]] = set()
        self.models_synced = False

    def update_models(self, items: Mapping[str, KeyValue]) -> None:
        models: dict[str, ModelSpec] = {}
        for key, kv in items.items():
            try:
                spec = ModelSpec.from_dict(loads(kv.value))
            except ValidationError as e:
                self._warn(key, kv, e)
                continue
            if keys.model_key(spec.name) != key:
                self._warn(key, kv, ValidationError("name", f"'{spec.name}' does not match its key"))
                continue
            models[spec.name] = spec
        self._prune(items)
        self.models = models
        self.models_synced = True

    def _warn(self, key: str, kv: KeyValue, e: ValidationError) -> None:
        # Every update re-delivers the whole prefix: warn once per bad record version, not per update.
        if (key, kv.mod_revision) not in self._warned:
            self._warned.add((key, kv.mod_revision))
            log.warning("ignoring invalid record %s: %s", key, e)

    def _prune(self, items: Mapping[str, KeyValue]) -> None:
        self._warned = {(k, rev) for k, rev in self._warned if k in items and items[k].mod_revision == rev}

    @staticmethod
    def model_entry(spec: ModelSpec, phases: Counter[Phase]) -> dict[str, Any]:
        """One entry of GET /v1/models: OpenAI's fields plus Nebula's (`phases`: of its instances)."""
        return {"id": spec.name, "object": "model", "created": 0, "owned_by": "nebula",
                "task": spec.task.value, "replicas": spec.replicas, "ready": phases.get(Phase.READY, 0),
                "phases": {p.value: n for p, n in sorted(phases.items())}}
