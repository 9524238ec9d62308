"""`nebula pull MODEL_OR_SOURCE [--nodes a,b]`: fetch a model's weights into nodes' caches ahead of a load.

It asks the admin API for a pull (one intent per node; each node's agent downloads, as it would for an
instance, and reports progress), follows it until every node has the weights, then withdraws the intents:
the weights stay cached, and the nodes advertise them, so the scheduler prefers those nodes for the model.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from nebula.cli.client import EXIT_FAILURE, EXIT_TIMEOUT, AdminClient, CliError
from nebula.core.model import NAME_RE


def add_pull_parser(sub: Any) -> None:
    p = sub.add_parser("pull", help="pre-fetch a model's weights onto nodes (hub sources)")
    p.add_argument("target", metavar="MODEL_OR_SOURCE",
                   help="a loaded model's name, or a source: org/name, hf://org/name, modelscope://org/name")
    p.add_argument("--nodes", default="", metavar="A,B", help="nodes to fetch onto (default: every live node)")
    p.add_argument("--revision", help="branch, tag or commit of a source (default: the hub's default)")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS", help="give up after this long (0: never)")
    p.add_argument("--no-wait", action="store_true", help="ask for the pull and return; `nebula pull` again to follow")
    p.add_argument("--json", action="store_true")


def pull_command(client: AdminClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.target} if NAME_RE.match(args.target) else {"source": args.target}
    if args.revision:
        body["revision"] = args.revision
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if nodes:
        body["nodes"] = nodes
    created = client.call("POST", "/v1/admin/pulls", body)
    if not args.json:
        print(f"pulling {created['source']} onto {', '.join(created['nodes'])}")
    if args.no_wait:
        if args.json:
            print(json.dumps(created, indent=2, sort_keys=True))
        return 0
    return follow(client, created["id"], timeout_s=args.timeout, as_json=args.json)


def follow(client: AdminClient, pull_id: str, *, timeout_s: float, as_json: bool,
           sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
    deadline = clock() + timeout_s if timeout_s > 0 else None
    shown: dict[str, str] = {}
    while True:
        pull = client.call("GET", f"/v1/admin/pulls/{pull_id}")
        states: dict[str, dict[str, Any]] = pull["nodes"]
        for node, st in sorted(states.items()):
            line = f"  {node}: {st['phase']}" + (f" {st['message']}" if st["phase"] != "ready" else "")
            if not as_json and shown.get(node) != line:
                print(line)
                shown[node] = line
        failed = {n: s for n, s in states.items() if s["phase"] == "failed"}
        done = all(s["phase"] == "ready" for s in states.values())
        if failed or done:
            client.call("DELETE", f"/v1/admin/pulls/{pull_id}")  # fulfilled or hopeless: the cache stays
            if as_json:
                print(json.dumps(pull, indent=2, sort_keys=True))
            if failed:
                node, st = sorted(failed.items())[0]
                raise CliError(f"pull of {pull['source']} failed on {node}: {st['message']}", EXIT_FAILURE)
            if not as_json:
                print(f"{pull['source']} is cached on {', '.join(sorted(states))}")
            return 0
        if deadline is not None and clock() > deadline:
            raise CliError(f"pull of {pull['source']} not done after {timeout_s:.0f} s; it goes on in the background "
                           "(run the same `nebula pull` again to follow it)", EXIT_TIMEOUT)
        sleep(1.0)
