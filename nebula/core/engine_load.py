"""What one engine reports about its load: the value type routing decides on (read by adapters/engine_metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineLoad:
    """One reading of an engine: requests queued and running, and KV cache usage as a fraction (0-1)."""

    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0
    # The token counters ride along with the reading but are no part of the load: two readings with
    # the same queues and cache are the same load (None: the engine exposes no such counter).
    prompt_tokens: float | None = field(default=None, compare=False)
    generation_tokens: float | None = field(default=None, compare=False)
