"""Cluster-wide status of a model that no single instance reports: why replicas are pending
(`/nebula/status/models/<name>`, written by the scheduler leader, shown by the admin API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nebula.core.model import expect_field, expect_number
from nebula.errors import ValidationError


@dataclass(frozen=True)
class ModelStatus:
    model: str
    pending: str
    """Why some replicas fit nowhere (for people)."""
    since: float = 0.0

    @staticmethod
    def from_dict(obj: object) -> ModelStatus:
        if not isinstance(obj, dict):
            raise ValidationError("", "model status must be a JSON object")
        return ModelStatus(model=expect_field(obj, "model", str), pending=expect_field(obj, "pending", str),
                           since=expect_number(obj, "since", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "pending": self.pending, "since": self.since}
