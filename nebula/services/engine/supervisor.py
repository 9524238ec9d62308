"""`nebula engine run <instance>`: the main process of `nebula-engine@<instance>.service`.

It runs vLLM's OpenAI server as its child and speaks sd_notify for it: STATUS= and EXTEND_TIMEOUT_USEC=
while the model loads (bounded by engine.startup_timeout_s), READY=1 once GET /health answers 200, then
WATCHDOG=1 only while /health keeps answering, so a hung engine is killed and restarted by systemd.
SIGTERM/SIGINT are forwarded to vLLM, which drains in-flight requests (bounded by engine.stop_timeout_s).
The same code runs without systemd (the process back-end): every notification is then a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from nebula.adapters.engine_runtimes import installed_runtimes, linked_runtime
from nebula.adapters.sdnotify import Notifier
from nebula.core.config import EngineConfig, NebulaConfig
from nebula.core.engine_runtime import Device, missing_runtime, runtime_device
from nebula.core.engine_spec import EngineSpec, check_engine_spec, vllm_command
from nebula.core.model_limits import ModelLimit, engine_max_model_len, model_limit
from nebula.errors import NebulaError, PermanentError, ValidationError

DEFAULT_ETC_ENGINES = Path("/etc/nebula/engines")
NVIDIA_DEVICE = Path("/dev/nvidia0")

# How long each EXTEND_TIMEOUT_USEC= grants at most: a few missed ticks must not fail the start.
_EXTEND_S = 30.0
# Startup polls more often than the steady-state health interval so READY comes soon after /health does.
_STARTUP_POLL_S = 0.5

log = logging.getLogger("nebula.engine")


class ExitCode(enum.IntEnum):
    """Exit statuses; the unit's RestartPreventExitStatus= names the permanent ones (no restart loop)."""

    OK = 0
    ENGINE_FAILED = 1
    BAD_SPEC = 2
    NO_SOURCE = 3
    STARTUP_TIMEOUT = 4


class SpecNotFound(PermanentError):
    pass


def load_spec(instance: str, run_dir: Path, etc_dir: Path = DEFAULT_ETC_ENGINES) -> EngineSpec:
    """The agent's `<run_dir>/engines/<instance>.json`, else the operator's `<etc_dir>/<instance>.toml`."""
    agent_path = run_dir / "engines" / f"{instance}.json"
    if agent_path.is_file():
        try:
            data = json.loads(agent_path.read_text())
        except ValueError as e:
            raise PermanentError(f"{agent_path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise PermanentError(f"{agent_path}: must hold a JSON object")
        return EngineSpec.from_dict(data, str(agent_path))
    hand_path = etc_dir / f"{instance}.toml"
    if hand_path.is_file():
        return EngineSpec.from_toml(hand_path.read_text(), instance, str(hand_path))
    raise SpecNotFound(f"no spec for engine {instance}: neither {agent_path} nor {hand_path} exists")


def read_model_limit(model_dir: Path) -> ModelLimit | None:
    """The model's own sequence limit from the config files in its directory (read once, at start); None
    when they do not say or cannot be read (vLLM then reports the problem with the files itself)."""
    def read(name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    config = read("config.json")
    if config is None:
        return None
    return model_limit(config, read("tokenizer_config.json"), read("sentence_bert_config.json"))


def engine_on_cpu(device: str, nvidia_device: Path = NVIDIA_DEVICE, runtime: Device | None = None) -> bool:
    """`runtime`: the device the engine runtime's name says, which decides 'auto' (a CPU runtime may run on a
    node with GPUs); without one, 'auto' means a GPU where the node has one."""
    if device == "auto":
        return runtime == "cpu" if runtime is not None else not nvidia_device.exists()
    return device == "cpu"


def spec_runtime_device(spec: EngineSpec, cfg: EngineConfig) -> Device | None:
    """The device of the runtime `spec` runs: its engine_runtime's name, or for the default runtime the name
    its link points at (install-engine.sh links `vllm` to e.g. vllm-0.32-cpu)."""
    if spec.engine_runtime is not None and spec.engine_runtime != cfg.default_runtime:
        return runtime_device(spec.engine_runtime)
    linked = linked_runtime(cfg)
    return runtime_device(linked) if linked else None


async def check_health(session: aiohttp.ClientSession, url: str, timeout_s: float) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


class EngineSupervisor:
    """Runs one vLLM child to completion; `run()` returns the supervisor's exit code."""

    def __init__(self, spec: EngineSpec, cfg: EngineConfig, notifier: Notifier, env: Mapping[str, str], *,
                 cpu: bool, otlp_endpoint: str = "", model_limit: ModelLimit | None = None) -> None:
        self._spec = spec
        self._model_limit = model_limit
        self._otlp_endpoint = otlp_endpoint
        self._cfg = cfg
        self._notifier = notifier
        self._env = env
        self._cpu = cpu
        self._stop = asyncio.Event()
        self._log = logging.LoggerAdapter(log, {"NEBULA_INSTANCE": spec.instance, "NEBULA_MODEL": spec.model})

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            child = await self._spawn()
            async with aiohttp.ClientSession() as session:
                return await self._supervise(child, session)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._log.info("received %s: draining the engine", sig.name)
        self._stop.set()

    async def _spawn(self) -> asyncio.subprocess.Process:
        argv, extra_env = vllm_command(self._spec, self._cfg, cpu=self._cpu,
                                       otlp_endpoint=self._otlp_endpoint, model_limit=self._model_limit)
        self._log.info("starting engine: %s", " ".join(argv))
        self._notifier.notify(STATUS=f"starting {self._spec.model}")
        # stdout/stderr are inherited: vLLM's own output lands in the unit's journal.
        return await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL,
                                                    env={**self._env, **extra_env})

    async def _supervise(self, child: asyncio.subprocess.Process, session: aiohttp.ClientSession) -> int:
        exited = asyncio.ensure_future(child.wait())
        try:
            outcome = await self._wait_ready(exited, session)
            if outcome is None:
                self._notifier.notify(READY=1, STATUS=f"serving {self._spec.model} at {self._spec.endpoint}")
                self._log.info("engine ready at %s", self._spec.endpoint)
                outcome = await self._watch(exited, session)
            if outcome is ExitCode.ENGINE_FAILED:
                if exited.done():
                    self._log.error("engine exited unexpectedly with status %s", child.returncode)
                return outcome  # a hung engine is killed on the way out
            await self._drain(child, exited)
            return outcome
        finally:
            if not exited.done():
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await exited

    async def _wait_ready(self, exited: asyncio.Future[int],
                          session: aiohttp.ClientSession) -> ExitCode | None:
        """None once /health answers; else why the start ended (child died, stop asked, timed out)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._cfg.startup_timeout_s
        url = f"{self._spec.endpoint}/health"
        while True:
            if await check_health(session, url, self._cfg.health_timeout_s):
                return None
            now = loop.time()
            if now >= deadline:
                self._log.error("engine not healthy after %.0f s (engine.startup_timeout_s)",
                                self._cfg.startup_timeout_s)
                return ExitCode.STARTUP_TIMEOUT
            grant = min(_EXTEND_S, deadline - now)
            self._notifier.notify(STATUS=f"loading {self._spec.model} ({now - started:.0f} s)",
                                  EXTEND_TIMEOUT_USEC=int(grant * 1e6))
            event = await self._pause(exited, _STARTUP_POLL_S)
            if event is not None:
                return event

    async def _watch(self, exited: asyncio.Future[int], session: aiohttp.ClientSession) -> ExitCode:
        """Feed the watchdog while /health answers; return when the child exits or a stop is asked."""
        interval = self._cfg.health_interval_s
        if self._notifier.watchdog_interval_s is not None:
            interval = min(interval, self._notifier.watchdog_interval_s)
        url = f"{self._spec.endpoint}/health"
        healthy = True
        loop = asyncio.get_running_loop()
        unhealthy_since = loop.time()
        # Without systemd's watchdog (the process back-end) nothing else would end a hung engine.
        own_watchdog = self._notifier.watchdog_interval_s is None
        while True:
            ok = await check_health(session, url, min(self._cfg.health_timeout_s, interval))
            if ok:
                self._notifier.notify(WATCHDOG=1)
            if ok != healthy:
                healthy = ok
                unhealthy_since = loop.time()
                self._report_health(ok)
            if not healthy and own_watchdog and loop.time() - unhealthy_since >= self._cfg.watchdog_s:
                self._log.error("engine /health has not answered for %.0f s (engine.watchdog_s): killing it",
                                self._cfg.watchdog_s)
                return ExitCode.ENGINE_FAILED
            event = await self._pause(exited, interval)
            if event is not None:
                return event

    def _report_health(self, ok: bool) -> None:
        if ok:
            self._log.info("engine healthy again")
            self._notifier.notify(STATUS=f"serving {self._spec.model} at {self._spec.endpoint}")
        else:
            # No WATCHDOG=1 from now on: if this lasts, systemd kills and restarts the unit.
            self._log.warning("engine /health not answering; withholding the watchdog")
            self._notifier.notify(STATUS=f"unhealthy: {self._spec.model} /health not answering")

    async def _pause(self, exited: asyncio.Future[int], seconds: float) -> ExitCode | None:
        """Sleep up to `seconds`; report a child exit or a stop request as soon as it happens."""
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {exited, stop}
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if exited.done():
            # A requested stop that vLLM obeyed on its own (e.g. a shared SIGTERM) is still a clean stop.
            return ExitCode.OK if self._stop.is_set() else ExitCode.ENGINE_FAILED
        return ExitCode.OK if self._stop.is_set() else None

    async def _drain(self, child: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        if exited.done():
            return
        self._notifier.notify(STOPPING=1, STATUS=f"draining {self._spec.model}")
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        # asyncio.wait leaves `exited` running at its timeout (it is awaited after the kill).
        if (await asyncio.wait([exited], timeout=self._cfg.stop_timeout_s))[0]:
            self._log.info("engine stopped (status %s)", child.returncode)
            return
        self._log.warning("engine still running after %.0f s (engine.stop_timeout_s): killing it",
                          self._cfg.stop_timeout_s)
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await exited


def run_engine(instance: str, cfg: NebulaConfig, env: Mapping[str, str], *,
               nvidia_device: Path = NVIDIA_DEVICE) -> int:
    """Run the engine of `instance` until it stops; the process's exit code."""
    fields = {"NEBULA_INSTANCE": instance}
    notifier = Notifier(env)
    try:
        try:
            spec = load_spec(instance, Path(cfg.node.run_dir), Path(cfg.engine.hand_specs_dir))
            # Again here, not only at the admin API: the spec file may have been written by anything.
            check_engine_spec(spec, cfg.engine)
        except NebulaError as e:
            log.error("cannot start engine: %s", e, extra=fields)
            notifier.notify(STATUS=f"bad spec: {e}")
            return ExitCode.BAD_SPEC
        if not Path(spec.source).exists():
            log.error("model source %s does not exist", spec.source,
                      extra={**fields, "NEBULA_MODEL": spec.model})
            notifier.notify(STATUS=f"model source {spec.source} does not exist")
            return ExitCode.NO_SOURCE
        # A runtime the agent saw may be gone since (removed by hand), and a hand-written spec is checked nowhere else.
        if reason := missing_runtime(spec.engine_runtime, installed_runtimes(cfg.engine), cfg.engine):
            log.error("cannot start engine: %s", reason, extra={**fields, "NEBULA_MODEL": spec.model})
            notifier.notify(STATUS=f"bad spec: {reason}")
            return ExitCode.BAD_SPEC
        limit = read_model_limit(Path(spec.source))
        try:
            engine_max_model_len(spec.max_model_len, cfg.engine.default_max_model_len, limit)
        except ValidationError as e:
            # Exit 2 (RestartPreventExitStatus): no start can fix the spec; this line is the failure's reason.
            log.error("cannot start engine: %s", e.message, extra={**fields, "NEBULA_MODEL": spec.model})
            notifier.notify(STATUS=f"bad spec: {e.message}")
            return ExitCode.BAD_SPEC
        cpu = engine_on_cpu(cfg.engine.vllm_device, nvidia_device, spec_runtime_device(spec, cfg.engine))
        supervisor = EngineSupervisor(spec, cfg.engine, notifier, env, cpu=cpu,
                                      otlp_endpoint=cfg.tracing.otlp_endpoint, model_limit=limit)
        return asyncio.run(supervisor.run())
    finally:
        notifier.close()
