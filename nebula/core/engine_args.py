"""Which `vllm serve` flags a model's `engine_args` may carry.

engine_args come from whoever may write a model spec (an admin key, or anything that can write to etcd) and
become part of every replica's command line on every node. Unfiltered they could add `--trust-remote-code`
(run the model repository's Python), `--middleware pkg:fn` (import any module into the engine), or
`--host 0.0.0.0` (an engine, which has no authentication, on every interface). So only flags the operator
allows pass (`[engine] allowed_engine_args`, by default harmless tuning flags); the admin API refuses the
rest (400), and the agent and the engine check again before a start, since a spec in etcd may have been
written by anything.

Flags are read the way vLLM's parser reads them (vllm/utils/argparse_utils.py, FlexibleArgumentParser):
`--flag value` and `--flag=value`, underscores as dashes (`--trust_remote_code`), a dotted field
(`--compilation-config.level=3`) as its flag, `--no-flag` as the negation of `--flag`, and argparse's
prefix abbreviations (`--trust-remote` is `--trust-remote-code`), which the allow-list's exact match and
the prefix check of the flags below shut out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nebula.errors import ValidationError

ALLOWED_KEY = "engine.allowed_engine_args"
TRUST_KEY = "engine.allow_trust_remote_code"

# Tuning flags that change how fast or how much an engine serves, not what it runs or where it listens.
# Names as vLLM 0.32 spells them (EngineArgs and the OpenAI frontend's arguments); --swap-space is gone
# from vLLM since 0.11 and is left out.
DEFAULT_ALLOWED_ENGINE_ARGS = (
    "--dtype", "--max-num-seqs", "--gpu-memory-utilization", "--enforce-eager", "--quantization",
    "--kv-cache-dtype", "--max-num-batched-tokens", "--enable-prefix-caching", "--enable-chunked-prefill",
    "--tool-call-parser", "--enable-auto-tool-choice", "--reasoning-parser", "--chat-template-content-format",
    "--tensor-parallel-size", "--pipeline-parallel-size", "--seed", "--block-size", "--limit-mm-per-prompt",
    "--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras", "--structured-outputs-config",
    "--max-logprobs", "--disable-log-stats", "--scheduling-policy", "--disable-sliding-window",
)

# Nebula sets these itself (where the engine listens, the name the gateway routes by), or they run code,
# read host files or change who may call the engine: never through engine_args, even if allow-listed.
# --trust-remote-code is the spec's own boolean, which [engine] allow_trust_remote_code must permit.
NEVER_ENGINE_ARGS = frozenset({
    "--host", "--port", "--uds", "--served-model-name", "--middleware", "--allowed-local-media-path",
    "--trust-remote-code", "--api-key", "--config", "--model",
})


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def flag_name(arg: str) -> str | None:
    """The flag an argv element names, as vLLM's parser reads it; None for a value (`8`, `-1`, `float16`)."""
    if not arg.startswith("-") or _is_number(arg):
        return None
    name = arg.split("=", 1)[0]
    if not name.startswith("--"):
        return name  # a short flag counts only as written (-tp); joined forms (-qawq) match nothing
    return "--" + name[2:].split(".", 1)[0].replace("_", "-")


def _positive(name: str) -> str:
    return "--" + name[5:] if name.startswith("--no-") else name


def never_allowed(name: str) -> bool:
    """A flag that is, or abbreviates (argparse's allow_abbrev), one of NEVER_ENGINE_ARGS."""
    return any(n == name or (name.startswith("--") and n.startswith(name)) for n in NEVER_ENGINE_ARGS)


def check_engine_args(args: Sequence[str], allowed: Iterable[str]) -> None:
    """Raises ValidationError (field engine_args) naming the first flag that may not pass, and the fix."""
    permitted = {flag_name(a) or a for a in allowed}
    for arg in args:
        name = flag_name(arg)
        if name is None:
            continue
        if never_allowed(name) or never_allowed(_positive(name)):
            hint = (" (set the spec's trust_remote_code instead, which [engine] allow_trust_remote_code must "
                    "permit)" if "--trust-remote-code".startswith(_positive(name)) else "")
            raise ValidationError("engine_args", f"'{name}' cannot be set through engine_args: Nebula sets it "
                                  f"itself or it would run code or expose the engine{hint}")
        if name not in permitted and _positive(name) not in permitted:
            raise ValidationError("engine_args", f"'{name}' is not an allowed engine argument; an operator may "
                                  f"add it to [engine] allowed_engine_args ({ALLOWED_KEY}) on the gateways "
                                  "and nodes")


def check_trust_remote_code(wanted: bool, allowed: bool) -> None:
    if wanted and not allowed:
        raise ValidationError("trust_remote_code", "this cluster does not run code shipped with models: an "
                              f"operator may allow it with [engine] allow_trust_remote_code = true ({TRUST_KEY})")


def check_engine_request(args: Sequence[str], trust_remote_code: bool, allowed: Iterable[str],
                         allow_trust_remote_code: bool) -> None:
    """Both checks, as the admin API, the agent and the engine make them."""
    check_trust_remote_code(trust_remote_code, allow_trust_remote_code)
    check_engine_args(args, allowed)
