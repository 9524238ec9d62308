"""Reading a LoRA adapter's own description (its PEFT adapter_config.json) from a local directory."""

from __future__ import annotations

import json
from pathlib import Path

from nebula.core.sources import SourceKind, parse_source
from nebula.errors import ValidationError

MAX_CONFIG_BYTES = 1 << 20


def read_adapter_config(source: str) -> object | None:
    """The parsed adapter_config.json of a local adapter source; None for a hub source (not read at the
    gateway: the engine checks it where it loads it) or a file that is absent, unreadable or not JSON."""
    try:
        ref = parse_source(source)
    except ValidationError:
        return None
    if ref.kind is not SourceKind.LOCAL:
        return None
    path = Path(ref.location) / "adapter_config.json"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_CONFIG_BYTES:
        return None
    try:
        config: object = json.loads(raw)
        return config
    except (ValueError, RecursionError):
        return None
