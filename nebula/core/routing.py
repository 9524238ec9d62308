"""Routing policy: which replica of a model gets the next request. Pure functions, no I/O.

The gateway keeps the state (ready replicas, outstanding requests, the engines' polled load, a turn counter
per model) and asks these functions for decisions, so the policy is tested exhaustively without sockets.

Least loaded: each replica scores its in-flight requests from this gateway, plus the requests queued in
its engine (weighted: a queued request waits for a batch slot, a running one only shares the batch), plus
a penalty while its KV cache is nearly full (vLLM preempts running requests then). Prefix affinity: a
request carrying a prefix key goes to the key's rendezvous (highest-random-weight) replica while that one
is not overloaded, so a conversation keeps hitting the engine whose prefix cache holds its prompt.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from nebula.core.engine_load import EngineLoad
from nebula.core.model import InstanceStatus, Phase, Task
from nebula.core.response_ids import replica_token

# Characters of the system prompt and of the first user message that make the key: enough to tell
# conversations apart, bounded so the gateway's hashing cost does not grow with the prompt.
PREFIX_CHARS: Final = 1024


_MASK64: Final = (1 << 64) - 1


def _stable_hash(text: str) -> int:
    # blake2b is in the stdlib and stable across processes (unlike hash()), so a key keeps its home when
    # a gateway restarts and every gateway behind the same balancer agrees on it.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big")


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit ints that spreads every input bit over the output."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class Replica:
    """A READY instance the gateway may send requests to. Identity for load tracking is the endpoint."""

    instance: str
    model: str
    endpoint: str
    task: Task
    node: str = field(default="", compare=False)
    restarts: int = field(default=0, compare=False)  # of its engine: a restarted engine lost its memory
    # The endpoint's hash, computed once per table update rather than per request (rendezvous weights).
    endpoint_hash: int = field(init=False, compare=False, repr=False)
    # Names this incarnation in the response ids it makes (core/response_ids.py); computed once, like the hash.
    incarnation: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoint_hash", _stable_hash(self.endpoint))
        object.__setattr__(self, "incarnation", replica_token(self.instance, self.node, self.endpoint,
                                                              self.restarts))


def ready_replicas(statuses: Iterable[InstanceStatus]) -> dict[str, tuple[Replica, ...]]:
    """Per model, its READY replicas with an endpoint, in a stable order (by endpoint, then instance).

    A stable order is what makes tie-breaking deterministic: the same table and turn always pick
    the same replica. Two instances claiming one endpoint (a stale record beside its successor) count once.
    """
    by_model: dict[str, dict[str, Replica]] = {}
    for st in statuses:
        if st.phase is not Phase.READY or not st.endpoint:
            continue
        endpoint = st.endpoint.rstrip("/")
        replicas = by_model.setdefault(st.model, {})
        seen = replicas.get(endpoint)
        if seen is None or st.instance < seen.instance:
            replicas[endpoint] = Replica(instance=st.instance, model=st.model, endpoint=endpoint,
                                         task=st.task, node=st.node, restarts=st.restarts)
    return {model: tuple(sorted(reps.values(), key=lambda r: (r.endpoint, r.instance)))
            for model, reps in by_model.items()}


@dataclass(frozen=True)
class LoadPolicy:
    """The knobs of the policy (GatewayConfig carries them; the defaults here are for tests)."""

    waiting_weight: float = 2.0
    kv_cache_threshold: float = 0.9
    kv_cache_penalty: float = 8.0
    affinity_slack: float = 4.0


def kv_cache_hot(load: EngineLoad | None, policy: LoadPolicy) -> bool:
    """True when the engine reported a KV cache at or above the threshold (unknown load: not hot)."""
    return load is not None and load.kv_cache_usage >= policy.kv_cache_threshold


def load_score(inflight: int, load: EngineLoad | None, policy: LoadPolicy) -> float:
    """Lower is less loaded. `load` None (never polled, or the poll failed): in-flight requests only."""
    score = float(inflight)
    if load is not None:
        score += policy.waiting_weight * load.waiting
        if kv_cache_hot(load, policy):
            score += policy.kv_cache_penalty
    return score


def _home_index(candidates: Sequence[Replica], key: str) -> int:
    # Weight of (key, replica) = mix(hash(key) ^ hash(endpoint)): one blake2b per request, not one per
    # candidate. The endpoint breaks the (astronomically rare) tie of equal weights deterministically.
    key_hash = _stable_hash(key)
    return max(range(len(candidates)),
               key=lambda i: (_mix64(key_hash ^ candidates[i].endpoint_hash), candidates[i].endpoint))


def rendezvous_home(candidates: Sequence[Replica], key: str) -> Replica | None:
    """The replica with the highest weight for (key, endpoint): rendezvous (highest-random-weight) hashing.

    Adding a replica only takes the keys it now wins, removing one only moves the keys it held, so the
    prefix caches of the other replicas stay useful when the set changes. Candidate order does not matter.
    """
    return candidates[_home_index(candidates, key)] if candidates else None


def pick_replica(candidates: Sequence[Replica], inflight: Mapping[str, int], loads: Mapping[str, EngineLoad],
                 exclude: Collection[str], turn: int, prefix: str | None = None,
                 policy: LoadPolicy = LoadPolicy()) -> Replica | None:
    """The replica for the next request, among `candidates` (READY ones) not in `exclude`.

    `inflight` and `loads` are keyed by endpoint (missing: 0 in flight, load unknown); `exclude` holds
    endpoints already tried for this request. With a `prefix` key, its rendezvous home among the allowed
    replicas wins while its KV cache is not hot and its score is within `affinity_slack` of the best.
    Otherwise the least-scored replica; among equals the `turn`-th (mod their count): the caller advances
    `turn` after each pick, so equal replicas take turns instead of the first one soaking up a burst.
    """
    allowed = [r for r in candidates if r.endpoint not in exclude]
    if len(allowed) <= 1:
        return allowed[0] if allowed else None  # nothing to weigh (the common single-replica case)
    scores = [load_score(inflight.get(r.endpoint, 0), loads.get(r.endpoint), policy) for r in allowed]
    best = min(scores)
    if prefix is not None:
        i = _home_index(allowed, prefix)
        if scores[i] <= best + policy.affinity_slack and not kv_cache_hot(loads.get(allowed[i].endpoint), policy):
            return allowed[i]
    ties = [r for r, s in zip(allowed, scores, strict=True) if s == best]
    return ties[turn % len(ties)]


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content
                       if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


def _chat_prefix(messages: Any, top_system: Any = None) -> tuple[str, str] | None:
    if not isinstance(messages, list):
        return None
    user = None
    # Anthropic's Messages API puts the system prompt beside the messages (a string or text blocks).
    system = _text(top_system)[:PREFIX_CHARS] or None
    for m in messages:
        if not isinstance(m, Mapping):
            continue
        role = m.get("role")
        if system is None and role in ("system", "developer"):
            system = _text(m.get("content"))[:PREFIX_CHARS]
        elif user is None and role == "user":
            user = _text(m.get("content"))[:PREFIX_CHARS]
        if user is not None:
            break  # a system prompt after the first user message is not part of the shared prefix
    if not system and not user:
        return None
    return system or "", user or ""


def _completion_prefix(prompt: Any) -> str | None:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of prompts: the first one's engine is as good a home as any
    if isinstance(prompt, str):
        return prompt[:PREFIX_CHARS] or None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:PREFIX_CHARS]):
        return ",".join(map(str, prompt[:PREFIX_CHARS]))  # token ids
    return None


def prefix_key(body: Mapping[str, Any]) -> str | None:
    """The affinity key of a parsed request body (16 lowercase hex chars), handed to the replica pick.

    Chat (`messages`, OpenAI's or Anthropic's): model + the first PREFIX_CHARS characters of the system
    prompt (Anthropic's top-level `system`, else the first system or developer message) and of the first
    user message, so every turn of a conversation gets the same key; the Responses API's `instructions` and
    `input` likewise. Completions (`prompt`): model + the first PREFIX_CHARS characters of the prompt (of the
    first prompt of a batch; token-id prompts by their first PREFIX_CHARS ids). Anything else (rerank,
    score) or a body without text: None, and the pick is by load alone. Asked for generate requests only (an
    embeddings `input` would read as a Responses one). Never raises, whatever the body holds.
    """
    model = body.get("model")
    if not isinstance(model, str):
        return None
    parts: tuple[str, ...] | None
    if "messages" in body:
        parts = _chat_prefix(body["messages"], body.get("system"))
    elif "prompt" in body:
        prompt = _completion_prefix(body["prompt"])
        parts = None if prompt is None else (prompt,)
    elif "input" in body:  # the Responses API: `instructions` and `input`, a string or message items
        items = body["input"]
        parts = _chat_prefix(items if isinstance(items, list) else [{"role": "user", "content": items}],
                             body.get("instructions"))
    else:
        parts = None
    if parts is None:
        return None
    # Each part length-prefixed: an unambiguous encoding (no separator can be forged by the content), and
    # several times cheaper than serializing the parts first (this runs on every generate request).
    h = hashlib.blake2b(digest_size=8)
    for part in (model, *parts):
        data = part.encode("utf-8", "replace")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def phase_counts(statuses: Iterable[InstanceStatus]) -> dict[str, Counter[Phase]]:
    """Per model, how many of its instances are in each phase (for /metrics and /v1/models)."""
    out: dict[str, Counter[Phase]] = {}
    for st in statuses:
        out.setdefault(st.model, Counter())[st.phase] += 1
    return out
