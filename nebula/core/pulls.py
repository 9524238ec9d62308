"""Pull intents: "have these weights on that node" (`nebula pull`), and what the node reports back.

The admin API writes one intent per node (`/nebula/pulls/<node>/<id>`); that node's agent downloads the
source into its cache as it would for an instance, and reports progress under its lease
(`/nebula/pull-status/<node>/<id>`). The id is derived from the source, so pulling the same weights twice
is one intent.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

from nebula.core.model import expect_field, expect_number, validate_name
from nebula.core.sources import parse_source
from nebula.errors import ValidationError


class PullPhase(enum.StrEnum):
    DOWNLOADING = "downloading"
    READY = "ready"
    FAILED = "failed"


def pull_id(source_id: str) -> str:
    return hashlib.sha256(source_id.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PullIntent:
    id: str
    node: str
    source: str
    revision: str | None = None
    created: float = 0.0

    @staticmethod
    def new(node: str, source: str, revision: str | None, created: float) -> PullIntent:
        ref = parse_source(source, revision)
        if not ref.is_hub:
            raise ValidationError("source", "only hub sources (org/name, hf://, modelscope://) can be pulled; a "
                                  "local directory is on the node already")
        return PullIntent(id=pull_id(ref.id), node=validate_name(node, "nodes"), source=f"{ref.kind.value}://{ref.location}",
                          revision=revision, created=created)

    @property
    def source_id(self) -> str:
        return parse_source(self.source, self.revision).id

    @staticmethod
    def from_dict(obj: object) -> PullIntent:
        if not isinstance(obj, dict):
            raise ValidationError("", "pull intent must be a JSON object")
        source = expect_field(obj, "source", str)
        revision = expect_field(obj, "revision", str, None)
        parse_source(source, revision)
        return PullIntent(id=expect_field(obj, "id", str), node=validate_name(expect_field(obj, "node", str)),
                          source=source, revision=revision,
                          created=expect_number(obj, "created", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.node, "source": self.source, "revision": self.revision,
                "created": self.created}


@dataclass(frozen=True)
class PullStatus:
    id: str
    node: str
    source: str
    phase: PullPhase
    message: str = ""
    progress: float | None = None

    @staticmethod
    def from_dict(obj: object) -> PullStatus:
        if not isinstance(obj, dict):
            raise ValidationError("", "pull status must be a JSON object")
        try:
            phase = PullPhase(expect_field(obj, "phase", str))
        except ValueError as e:
            raise ValidationError("phase", str(e)) from None
        progress = None if obj.get("progress") is None else expect_number(obj, "progress")
        return PullStatus(id=expect_field(obj, "id", str), node=expect_field(obj, "node", str),
                          source=expect_field(obj, "source", str), phase=phase,
                          message=expect_field(obj, "message", str, ""),
                          progress=progress)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.node, "source": self.source, "phase": self.phase.value,
                "message": self.message, "progress": self.progress}
