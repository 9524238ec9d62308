"""`nebula`: run a service, bring a one-machine cluster up or down, and operate models."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from nebula import __version__
from nebula.cli import elastic
from nebula.cli import rollout as rollout_cli
from nebula.cli.catalog import add_catalog_parser, catalog_command
from nebula.cli.client import EXIT_CODES_HELP, EXIT_USAGE, AdminClient, CliError, admin_key, gateway_url
from nebula.cli.keys import add_keys_parser, keys_command
from nebula.cli.lora import adapter_command, add_adapter_parser
from nebula.cli.pull import add_pull_parser, pull_command
from nebula.cli.show import add_show_parser, show
from nebula.core.config import NebulaConfig
from nebula.errors import ConfigError, ValidationError
from nebula.services.runtime import config_path, load_config

SERVICES = ("gateway", "scheduler", "node")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nebula", description="Serve LLMs on your own GPU machines.",
                                epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"nebula {__version__}")
    p.add_argument("--config", help="config file (default: $NEBULA_CONFIG or /etc/nebula/nebula.toml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for svc in ("gateway", "scheduler"):
        s = sub.add_parser(svc, help=f"the {svc} service")
        s.add_argument("action", choices=["run"])
        if svc == "gateway":
            # Started by the gateway itself for each of gateway.workers (services/gateway/workers.py).
            s.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    add_node_parser(sub)
    e = sub.add_parser("engine", help="the engine supervisor of one instance (run by nebula-engine@.service)")
    e.add_argument("action", choices=["run"])
    e.add_argument("instance")

    sub.add_parser("up", help="start etcd (if none) and the control plane on this machine")
    sub.add_parser("down", help="stop the control plane and engines on this machine")
    sub.add_parser("supervise", help="(internal) run the control plane as child processes")

    ls = sub.add_parser("list", help="models, their replicas and phases")
    ls.add_argument("--json", action="store_true")
    ld = sub.add_parser("load", help="load a model (writes its desired state)")
    ld.add_argument("name", help="the name it is served as; with no --source, a catalog name (`nebula catalog`)")
    ld.add_argument("--source",
                    help="model directory (a relative one must exist here and is sent absolute), Hugging Face "
                    "repo (org/name, hf://org/name), modelscope://org/name, or a catalog name (default: NAME)")
    ld.add_argument("--size", help="with a catalog name: the entry's size (e.g. 7b)")
    ld.add_argument("--quant", help="with a catalog name: the variant's quantization (e.g. awq, fp8)")
    ld.add_argument("--task", choices=["generate", "embed", "rerank", "transcribe"],
                    help="default: the catalog entry's, else generate")
    ld.add_argument("--replicas", type=int, help="replicas to start with (default 1; an elastic model's "
                    "--min-replicas when above 1)")
    ld.add_argument("--max-model-len", type=int)
    ld.add_argument("--engine-arg", action="append", default=[], dest="engine_args",
                    help="extra `vllm serve` argument (repeatable), e.g. --engine-arg=--dtype=float32")
    ld.add_argument("--trust-remote-code", action="store_true",
                    help="run Python code shipped with the model (the cluster must allow it: "
                    "[engine] allow_trust_remote_code)")
    ld.add_argument("--engine-runtime", help="engine runtime on the nodes (e.g. vllm-0.32-cu13; default: each "
                    "node's default runtime)")
    ld.add_argument("--gpus", type=int, dest="gpus_per_replica",
                    help="GPUs per replica (default: the fewest that hold the model's memory estimate)")
    ld.add_argument("--allow-pending", action="store_true",
                    help="load even when no GPU holds the model's estimate now: it waits pending for one")
    elastic.add_flags(ld)
    ld.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait until a replica is ready")
    ld.add_argument("--json", action="store_true")
    sc = sub.add_parser("scale", help="change a model's replica count (removed replicas drain)")
    sc.add_argument("name")
    sc.add_argument("replicas", type=int)
    sc.add_argument("--json", action="store_true")
    ul = sub.add_parser("unload", help="unload a model (drains, then stops its engines)")
    ul.add_argument("name")
    ul.add_argument("--json", action="store_true")
    st = sub.add_parser("status", help="control plane health, nodes and models at a glance (exit 1: unhealthy)")
    st.add_argument("--json", action="store_true")
    st.add_argument("-w", "--watch", action="store_true", help="redraw until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="--watch refresh (default 2)")
    add_show_parser(sub)
    rollout_cli.add_update_parser(sub)
    add_catalog_parser(sub)
    add_logs_parser(sub)
    add_pull_parser(sub)
    add_keys_parser(sub)
    add_adapter_parser(sub)
    cf = sub.add_parser("config", help="check or write the config file")
    cf.add_argument("action", choices=["check", "init", "show"])
    cf.add_argument("--json", action="store_true", help="check, show: machine-readable output")
    cf.add_argument("--stdout", action="store_true", help="init: print the file instead of writing it (the "
                    "reference etc/nebula/nebula.toml)")
    return p


def add_node_parser(sub: Any) -> None:
    n = sub.add_parser("node", help="the node agent: run it, or join this machine to a cluster")
    nsub = n.add_subparsers(dest="action", required=True, metavar="ACTION")
    nsub.add_parser("run", help="run the node agent (what nebula-node.service runs)")
    rollout_cli.add_drain_parsers(nsub)
    j = nsub.add_parser("join", help="write this node's config (nebula.d/50-node.toml), check etcd, start the agent")
    j.add_argument("--etcd", required=True, metavar="URL[,URL...]", help="etcd client URL(s) of the cluster")
    j.add_argument("--name", default="", help="node name (default: the host name)")
    j.add_argument("--labels", default="", metavar="K=V[,K=V...]", help="node labels, e.g. zone=a,gpu=h100")
    j.add_argument("--address", default="",
                   help="address the gateway reaches this node's engines at (default: this machine's address "
                        "on the route to etcd)")
    j.add_argument("--config", dest="join_config", metavar="PATH",
                   help="main config file; the drop-in goes in nebula.d/ beside it (default: as --config)")
    j.add_argument("--no-start", action="store_true", help="write and check only; do not start nebula-node")
    j.add_argument("--engine", choices=("auto", "cpu", "gpu"), default="auto",
                   help="the engine runtime this node should have (default auto: GPU where NVML sees one, or "
                        "NEBULA_ENGINE_DEVICE); says the install command when it is missing")
    j.add_argument("--json", action="store_true")


def add_logs_parser(sub: Any) -> None:
    lg = sub.add_parser("logs", help="journal (or log files) of a model's engines or a service")
    lg.add_argument("target", nargs="?", default="",
                    help="model (all its replicas), instance (qwen:1), gateway/scheduler/node, or a unit name")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=100)
    lg.add_argument("--since", default="", help="e.g. 10m, 2h, today, '2025-01-31 12:00' (journalctl --since)")
    lg.add_argument("--node", default="", help="only this node's entries (the journal's _HOSTNAME)")
    where = lg.add_mutually_exclusive_group()
    where.add_argument("--remote", action="store_true",
                       help="read the journals shipped to this collector (/var/log/journal/remote)")
    where.add_argument("--directory", default="", metavar="DIR", help="read the journal files in DIR")


def prepare_process(environ: MutableMapping[str, str]) -> None:
    """Process-wide settings every nebula command needs before any library reads them.

    gRPC (under aetcd) registers fork handlers, and in the Python package they are half on: the core runs them
    while Python's side does not, so a fork (Popen of an engine, a gateway worker) while gRPC threads work can
    crash the child before it execs, or abort the parent. Measured with a busy etcd client and 300 spawns of
    /bin/true: 163 children died (SIGSEGV) and gRPC aborted once; with the handlers off, none. Nebula only ever
    forks to exec, which needs no handlers (grpc/grpc#13873, #29103)."""
    environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    prepare_process(os.environ)
    env = dict(os.environ if env is None else env)
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args, env)
    except (ConfigError, ValidationError) as e:
        print(f"nebula: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as e:
        print(f"nebula: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `nebula list --json | head`: the reader left. Point stdout at /dev/null so the interpreter's final
        # flush does not raise again, and end quietly as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the signal


def dispatch(args: argparse.Namespace, env: dict[str, str]) -> int:
    cmd = args.command
    if cmd == "config":
        from nebula.cli.config_cmd import config_command

        return config_command(args.action, args.config, env, as_json=args.json, stdout=args.stdout)
    if cmd == "node" and args.action == "join":
        from nebula.cli import node_join as nj

        req = nj.JoinRequest(etcd=tuple(u.strip() for u in args.etcd.split(",") if u.strip()), name=args.name,
                             labels=nj.parse_labels(args.labels), address=args.address, engine=args.engine)
        return nj.join(req, env, args.join_config or args.config, start=not args.no_start,
                       systemd=Path("/run/systemd/system").is_dir(), as_json=args.json)
    if cmd == "logs":
        from nebula.cli.logs import REMOTE_DIR, LogQuery, logs

        # The config is read only without systemd (where the log files are): a broken config must not
        # hide the logs that explain it.
        return logs(lambda: load_config(env, args.config),
                    LogQuery(target=args.target, follow=args.follow, lines=args.lines, since=args.since,
                             node=args.node, directory=REMOTE_DIR if args.remote else args.directory))
    cfg = load_config(env, args.config, skip_unreadable=cmd == "engine")
    if args.config:
        env["NEBULA_CONFIG"] = args.config  # children (supervise, engines) read the same file
    if cmd == "update" or (cmd == "node" and args.action in rollout_cli.NODE_ACTIONS):
        client = AdminClient(gateway_url(cfg, env), admin_key(env, cfg.gateway.admin_key_file))
        if cmd == "update":
            return rollout_cli.update(client, args, sys.stdout)
        return rollout_cli.node_command(client, args, sys.stdout)
    if cmd in SERVICES or cmd == "engine":
        return run_service(cmd, args, cfg, env)
    if cmd in ("up", "down", "supervise"):
        from nebula.cli import up

        return {"up": up.up, "down": up.down, "supervise": up.supervise_cmd}[cmd](cfg, env)
    client = AdminClient(gateway_url(cfg, env), admin_key(env, cfg.gateway.admin_key_file))
    if cmd == "pull":
        return pull_command(client, args)
    if cmd == "keys":
        return keys_command(client, args)
    if cmd == "adapter":
        return adapter_command(client, args, Path.cwd())
    if cmd == "catalog":
        return catalog_command(client, args, sys.stdout)
    if cmd == "show":
        return show(client, args.model, as_json=args.json, out=sys.stdout)
    from nebula.cli import models as m

    if cmd == "list":
        return m.list_models(client, as_json=args.json)
    if cmd == "load":
        wait_s = m.check_wait(args.wait)
        spec = m.load_spec(args, Path.cwd())
        return m.load(client, spec, wait_s=wait_s, as_json=args.json, out=sys.stdout)
    if cmd == "unload":
        return m.unload(client, args.name, as_json=args.json)
    if cmd == "scale":
        return m.scale(client, args.name, args.replicas, as_json=args.json)
    if cmd == "status":
        from nebula.cli import status as st

        if args.watch:
            if args.interval <= 0:
                raise CliError("--interval must be positive", EXIT_USAGE)
            if args.json:
                raise CliError("--watch redraws for people; scripts poll `nebula status --json`", EXIT_USAGE)
            return st.watch(client, interval_s=args.interval, out=sys.stdout)
        return st.status(client, as_json=args.json, out=sys.stdout)
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
        from nebula.services.gateway.main import run_gateway_process

        run_gateway_process(cfg, env, str(config_path(env, args.config)), args.worker)
    return 0


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
