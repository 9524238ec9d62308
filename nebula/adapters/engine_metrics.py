"""An engine's load, read from vLLM's Prometheus /metrics: parsing (pure) and the fetch of a /metrics.

vLLM labels its gauges {engine, model_name}; a server with data parallelism (or serving several names)
has several label sets, which are folded into one load per server: queue lengths add up, and the KV cache
usage is the fullest engine's, since a fraction summed over engines means nothing and the fullest engine
is the one that starts preempting first.

The same read carries the engine's token counters (prompt and generated tokens since it started), summed
over label sets, so the gateway counts tokens per model without touching the request path.
"""

from __future__ import annotations

import math

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from nebula.core.engine_load import EngineLoad

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
_GAUGES = (WAITING, RUNNING, KV_CACHE_USAGE)
_WANTED = (*_GAUGES, PROMPT_TOKENS, GENERATION_TOKENS)


class EngineMetricsError(Exception):
    """The engine's load could not be read: unreachable, slow, a non-200 answer, or no vLLM gauges."""


def _is_wanted(line: str) -> bool:
    """True for a sample, HELP or TYPE line of one of the wanted series (exact name, not a longer one)."""
    if line.startswith("# "):
        parts = line.split(" ", 3)
        return len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2] in _WANTED
    # startswith with a tuple is one C call: most lines (histogram buckets) are rejected by it alone.
    return line.startswith(_WANTED) and line.partition("{")[0].partition(" ")[0] in _WANTED


def parse_engine_load(text: str) -> EngineLoad:
    """The load in a vLLM /metrics exposition (Prometheus text format).

    Only the lines of the wanted series reach the parser: a vLLM exposition is mostly histogram buckets,
    and parsing all of it every second per replica would cost the gateway's event loop for nothing.
    Raises EngineMetricsError when the text is malformed or holds none of the gauges (not a vLLM server).
    """
    lines = [line for line in text.splitlines() if _is_wanted(line)]
    totals: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            for sample in family.samples:
                if sample.name in _WANTED and not math.isnan(sample.value):
                    totals.setdefault(sample.name, []).append(sample.value)
    except ValueError as e:
        raise EngineMetricsError(f"malformed metrics text: {e}") from None
    if not any(name in totals for name in _GAUGES):
        raise EngineMetricsError("no vLLM load gauges in the metrics text")
    prompt, generation = totals.get(PROMPT_TOKENS), totals.get(GENERATION_TOKENS)
    # Clamped: a nonsensical negative reading must not make a replica look better than idle.
    return EngineLoad(waiting=max(0.0, float(sum(totals.get(WAITING, ())))),
                      running=max(0.0, float(sum(totals.get(RUNNING, ())))),
                      kv_cache_usage=min(1.0, max(0.0, float(max(totals.get(KV_CACHE_USAGE, ()), default=0.0)))),
                      prompt_tokens=None if prompt is None else float(sum(prompt)),
                      generation_tokens=None if generation is None else float(sum(generation)))


async def fetch_metrics_text(http: aiohttp.ClientSession, base_url: str, timeout_s: float) -> str:
    """GET `base_url`/metrics (an engine's, or a node agent's) as text; any failure (including the timeout) is
    EngineMetricsError.

    Accept-Encoding is pinned to identity: vLLM's exporter gzips when offered, and the gateway's session
    does not decompress (it relays bytes untouched).
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with http.get(base_url.rstrip("/") + "/metrics", timeout=timeout,
                            headers={"Accept-Encoding": "identity"}) as resp:
            if resp.status != 200:
                raise EngineMetricsError(f"/metrics answered {resp.status}")
            return await resp.text(errors="replace")
    except (TimeoutError, aiohttp.ClientError) as e:
        raise EngineMetricsError(f"/metrics unreachable: {e!r}") from None


async def fetch_engine_load(http: aiohttp.ClientSession, endpoint: str, timeout_s: float) -> EngineLoad:
    """GET `endpoint`/metrics and parse it; any failure is EngineMetricsError."""
    return parse_engine_load(await fetch_metrics_text(http, endpoint, timeout_s))
