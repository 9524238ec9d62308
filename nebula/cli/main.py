"""`nebula`: run a service, bring a one-machine cluster up or down, and operate models."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from nebula import __version__
from nebula.cli.client import AdminClient, CliError, admin_key, gateway_url
from nebula.core.config import NebulaConfig
from nebula.errors import ConfigError, ValidationError
from nebula.services.runtime import load_config

SERVICES = ("gateway", "scheduler", "node")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nebula", description="Serve LLMs on your own GPU machines.")
    p.add_argument("--version", action="version", version=f"nebula {__version__}")
    p.add_argument("--config", help="config file (default: $NEBULA_CONFIG or /etc/nebula/nebula.toml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for svc in SERVICES:
        s = sub.add_parser(svc, help=f"the {svc} service")
        s.add_argument("action", choices=["run"])
    e = sub.add_parser("engine", help="the engine supervisor of one instance (run by nebula-engine@.service)")
    e.add_argument("action", choices=["run"])
    e.add_argument("instance")

    sub.add_parser("up", help="start etcd (if none) and the control plane on this machine")
    sub.add_parser("down", help="stop the control plane and engines on this machine")
    sub.add_parser("supervise", help="(internal) run the control plane as child processes")

    ls = sub.add_parser("list", help="models, their replicas and phases")
    ls.add_argument("--json", action="store_true")
    ld = sub.add_parser("load", help="load a model (writes its desired state)")
    ld.add_argument("name")
    ld.add_argument("--source", required=True, help="model directory (absolute path)")
    ld.add_argument("--task", default="generate", choices=["generate", "embed", "rerank"])
    ld.add_argument("--replicas", type=int, default=1)
    ld.add_argument("--max-model-len", type=int)
    ld.add_argument("--engine-arg", action="append", default=[], dest="engine_args",
                    help="extra `vllm serve` argument (repeatable), e.g. --engine-arg=--dtype=float32")
    ld.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait until a replica is ready")
    ld.add_argument("--json", action="store_true")
    sc = sub.add_parser("scale", help="change a model's replica count (removed replicas drain)")
    sc.add_argument("name")
    sc.add_argument("replicas", type=int)
    ul = sub.add_parser("unload", help="unload a model (drains, then stops its engines)")
    ul.add_argument("name")
    st = sub.add_parser("status", help="nodes and models at a glance")
    st.add_argument("--json", action="store_true")
    lg = sub.add_parser("logs", help="journal (or log files) of a model's engines or a service")
    lg.add_argument("target", nargs="?", default="", help="model name, or gateway/scheduler/node")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=100)
    cf = sub.add_parser("config", help="check or write the config file")
    cf.add_argument("action", choices=["check", "init", "show"])
    return p


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args, env)
    except (ConfigError, ValidationError) as e:
        print(f"nebula: {e}", file=sys.stderr)
        return 2
    except CliError as e:
        print(f"nebula: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


def dispatch(args: argparse.Namespace, env: dict[str, str]) -> int:
    cmd = args.command
    if cmd == "config":
        from nebula.cli.config_cmd import config_command

        return config_command(args.action, args.config, env)
    cfg = load_config(env, args.config)
    if args.config:
        env["NEBULA_CONFIG"] = args.config  # children (supervise, engines) read the same file
    if cmd in SERVICES or cmd == "engine":
        return run_service(cmd, args, cfg, env)
    if cmd in ("up", "down", "supervise"):
        from nebula.cli import up

        return {"up": up.up, "down": up.down, "supervise": up.supervise_cmd}[cmd](cfg, env)
    if cmd == "logs":
        from nebula.cli.logs import logs

        return logs(cfg, args.target, follow=args.follow, lines=args.lines)
    client = AdminClient(gateway_url(cfg, env), admin_key(env))
    from nebula.cli import models as m

    if cmd == "list":
        return m.list_models(client, as_json=args.json)
    if cmd == "load":
        spec: dict[str, Any] = {"name": args.name, "source": args.source, "task": args.task,
                                "replicas": args.replicas, "engine_args": args.engine_args}
        if args.max_model_len:
            spec["max_model_len"] = args.max_model_len
        return m.load(client, spec, wait_s=args.wait, as_json=args.json)
    if cmd == "unload":
        return m.unload(client, args.name)
    if cmd == "scale":
        return m.scale(client, args.name, args.replicas)
    if cmd == "status":
        return m.status(client, as_json=args.json)
    raise CliError(f"unknown command {cmd}")


def run_service(cmd: str, args: argparse.Namespace, cfg: NebulaConfig, env: dict[str, str]) -> int:
    from nebula.services.logsetup import setup_logging

    setup_logging(cmd, cfg.log.level, env)
    if cmd == "engine":
        from nebula.services.engine.supervisor import run_engine

        return run_engine(args.instance, cfg, env)
    if cmd == "node":
        from nebula.services.agent.main import run_agent

        asyncio.run(run_agent(cfg, env))
    elif cmd == "scheduler":
        from nebula.services.scheduler.main import run_scheduler

        asyncio.run(run_scheduler(cfg, env))
    elif cmd == "gateway":
        from nebula.services.gateway.main import run_gateway

        asyncio.run(run_gateway(cfg, env))
    return 0


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
