"""`nebula node join --etcd URL[,URL...] [--name N] [--labels k=v,...] [--address A] [--engine auto|cpu|gpu]
[--no-start]`.

Writes this node's settings as the drop-in nebula.d/50-node.toml beside the main config (the package's
conffile stays untouched, so upgrades never prompt), checks that etcd answers with the resulting config,
then enables and (re)starts nebula-node.service when systemd is PID 1. A failed check leaves the files as
they were. Last, the engine step: the runtime this machine calls for (GPU where NVML sees one, unless
--engine or NEBULA_ENGINE_DEVICE says otherwise) against those installed, and the install command if needed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from nebula.adapters.engine_runtimes import gpus_seen, installed_runtimes, linked_runtime
from nebula.adapters.timeouts import timeout
from nebula.cli.client import EXIT_FAILURE, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CliError
from nebula.cli.config_cmd import render_config
from nebula.core import keys, records
from nebula.core.config import NebulaConfig, parse_config
from nebula.core.engine_runtime import Device, choose_device, engine_advice
from nebula.core.model import validate_name
from nebula.errors import NebulaError, ValidationError
from nebula.services.runtime import config_path, load_config, node_name, open_store

DROPIN = "50-node.toml"
UNIT = "nebula-node.service"

# Returns the address of a live node already registered under `name` (None: the name is free).
EtcdCheck = Callable[[NebulaConfig, str], str | None]


@dataclass(frozen=True)
class EngineCheck:
    """The engine step: the runtime this machine calls for and what it has (nebula/core/engine_runtime.py)."""

    device: Device
    gpus: int
    runtimes: tuple[str, ...]
    linked: str | None
    advice: str
    """One line saying what to install; empty when the default runtime fits the machine."""

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "gpus": self.gpus, "runtimes": list(self.runtimes),
                "default": self.linked, "advice": self.advice}


def engine_check(cfg: NebulaConfig, requested: str, env: Mapping[str, str]) -> EngineCheck:
    """`requested` (--engine auto|cpu|gpu), else NEBULA_ENGINE_DEVICE, else a GPU runtime where NVML sees a
    GPU: the choice scripts/install-engine.sh makes, checked against the runtimes installed here."""
    gpus = gpus_seen()
    try:
        device = choose_device(requested, env.get("NEBULA_ENGINE_DEVICE", ""), gpus)
    except ValidationError as e:
        raise CliError(f"{e.field}: {e.message}", EXIT_USAGE) from None
    runtimes, linked = installed_runtimes(cfg.engine), linked_runtime(cfg.engine)
    return EngineCheck(device, gpus, runtimes, linked, engine_advice(device, runtimes, linked, cfg.engine))


@dataclass(frozen=True)
class JoinRequest:
    etcd: tuple[str, ...]
    name: str = ""
    labels: tuple[str, ...] = ()
    address: str = ""
    engine: str = "auto"
    """--engine: auto, cpu or gpu; the engine runtime this node should have."""


def parse_labels(text: str) -> tuple[str, ...]:
    labels = tuple(p.strip() for p in text.split(",") if p.strip())
    for label in labels:
        key, sep, _ = label.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--labels: {label!r} must look like key=value (e.g. --labels zone=a,gpu=h100)",
                           EXIT_USAGE)
    return labels


def join_table(req: JoinRequest) -> dict[str, Any]:
    """The drop-in's TOML tables. The engines listen on the node's address, so other machines reach them."""
    node: dict[str, Any] = {}
    if req.name:
        node["name"] = validate_name(req.name, "--name")
    if req.address:
        node["address"] = req.address
        node["engine_host"] = req.address
    if req.labels:
        node["labels"] = list(req.labels)
    return {"cluster": {"etcd_endpoints": list(req.etcd)}, "node": node}


def render_dropin(table: Mapping[str, Any]) -> str:
    return ("# Written by `nebula node join`; run it again to change these, or edit (keys as in nebula.toml).\n"
            + tomli_w.dumps(dict(table)))


def address_towards(url: str) -> str:
    """This machine's address on the route to `url`'s host (a UDP connect sends nothing)."""
    parts = urlsplit(url)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((parts.hostname or "127.0.0.1", parts.port or 2379))
            return str(s.getsockname()[0])
    except OSError:
        raise CliError(f"no route to etcd at {url}; check the URL, or pass --address", EXIT_UNREACHABLE) from None


def etcd_check(cfg: NebulaConfig, name: str) -> str | None:
    async def check() -> str | None:
        async with timeout(cfg.cluster.etcd_timeout_s + 2):
            store = await open_store(cfg)
            try:
                kv = await store.get(keys.node_key(name))
            finally:
                await store.close()
        if kv is None:
            return None
        try:
            return records.NODES.decode(kv.key, kv.value).address
        except ValidationError:
            return "(a record that does not decode)"  # the name is taken all the same

    # The store logs each failed endpoint for services; here the one-line error below says it all.
    quiet = logging.getLogger("nebula.adapters")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(check())
    except (NebulaError, OSError, TimeoutError) as e:
        urls = ", ".join(cfg.cluster.etcd_endpoints)
        raise CliError(f"etcd at {urls} does not answer ({type(e).__name__}: {e}); check the URL and that "
                       "etcd listens on an address this machine reaches (--listen-client-urls and "
                       "--advertise-client-urls, port 2379 open)", EXIT_UNREACHABLE) from None
    finally:
        quiet.setLevel(level)


def join(req: JoinRequest, env: Mapping[str, str], explicit: str | None, *, start: bool, systemd: bool,
         as_json: bool, check: EtcdCheck = etcd_check,
         run: Callable[[list[str]], subprocess.CompletedProcess[str]] | None = None,
         engine: Callable[[NebulaConfig, str, Mapping[str, str]], EngineCheck] = engine_check) -> int:
    if not req.etcd:
        raise CliError("--etcd: give at least one etcd URL, e.g. --etcd http://10.0.0.5:2379", EXIT_USAGE)
    if not req.address:
        req = replace(req, address=address_towards(req.etcd[0]))
    main = config_path(env, explicit)
    dropin = main.parent / "nebula.d" / DROPIN
    table = join_table(req)
    parse_config(table, {}, str(dropin))  # names the bad key before anything is written
    # What the unit will see: the files only, not this shell's NEBULA_<SECTION>_<KEY> overrides.
    file_env = {k: v for k, v in env.items() if k == "NEBULA_CONFIG" or not k.startswith("NEBULA_")}
    with _Written() as written:
        if not main.exists():
            written.write(main, render_config(NebulaConfig()))
        written.write(dropin, render_dropin(table))
        cfg = load_config(file_env, explicit)
        name = node_name(cfg)
        taken = check(cfg, name)
        if taken is not None and taken != cfg.node.address:
            raise CliError(f"a live node named {name} is registered from {taken}; pick another --name "
                           "(or stop that node's agent first)", EXIT_FAILURE)
        written.keep()
    started = _start(run or _systemctl) if start and systemd else False
    # After the join, and never failing it: the agent runs without a runtime and says why its models fail.
    eng = engine(cfg, req.engine, env)
    if as_json:
        print(json.dumps({"config": str(dropin), "node": name, "address": cfg.node.address,
                          "etcd": list(cfg.cluster.etcd_endpoints), "labels": list(cfg.node.labels),
                          "started": started, "engine": eng.to_dict()}, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"wrote {dropin}: node {name} at {cfg.node.address}, etcd {', '.join(cfg.cluster.etcd_endpoints)}")
    seen = f"{eng.gpus} GPU(s) seen" if eng.gpus else "no GPU seen"
    print(f"engine: {eng.advice}" if eng.advice else
          f"engine runtimes: {', '.join(eng.runtimes)} (default: {eng.linked or cfg.engine.default_runtime}; {seen})")
    if started:
        print(f"enabled and started {UNIT}; see it with `nebula status` (or `nebula logs node`)")
    elif not start:
        print(f"not started (--no-start): `systemctl enable --now {UNIT}` when ready")
    else:
        print("systemd is not PID 1 here: run the agent with `nebula node run` (or `nebula up`)")
    return EXIT_OK


def _systemctl(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _start(run: Callable[[list[str]], subprocess.CompletedProcess[str]]) -> bool:
    # restart, not start: an agent already running must pick up the new config (its engines keep running).
    for argv in (["systemctl", "enable", UNIT], ["systemctl", "restart", UNIT]):
        proc = run(argv)
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CliError(f"`{' '.join(argv)}` failed: {why[0]} (see `journalctl -u {UNIT}`)", EXIT_FAILURE)
    return True


class _Written:
    """Files written during a join, put back as they were unless keep() is called."""

    def __init__(self) -> None:
        self._before: list[tuple[Path, str | None]] = []
        self._kept = False

    def write(self, path: Path, text: str) -> None:
        self._before.append((path, path.read_text() if path.exists() else None))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)

    def keep(self) -> None:
        self._kept = True

    def __enter__(self) -> _Written:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._kept:
            return
        for path, text in reversed(self._before):
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)
