"""`nebula adapter add | ls | rm`: LoRA adapters served on the replicas of a base model (/v1/admin/adapters).

`add` records the adapter; each node's agent then loads it on every replica of the base (and again on a
replica that restarts). Requests name the adapter as their `model`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nebula.cli.client import EXIT_OK, AdminClient
from nebula.cli.views import table


def add_adapter_parser(sub: Any) -> None:
    a = sub.add_parser("adapter", help="LoRA adapters on a base model: add, list, remove")
    asub = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = asub.add_parser("add", help="serve a LoRA adapter on every replica of BASE (loaded with --enable-lora)")
    add.add_argument("base", metavar="BASE", help="the loaded model the adapter was trained on")
    add.add_argument("name", metavar="NAME", help="the adapter's name: what requests give as `model`")
    add.add_argument("--source", required=True, metavar="PATH_OR_HUB_ID",
                     help="the adapter's directory (adapter_config.json + weights), or a hub repo id")
    add.add_argument("--rank", type=int, metavar="R", help="its LoRA rank, when the gateway cannot read its files")
    add.add_argument("--json", action="store_true")
    ls = asub.add_parser("ls", help="adapters, their base and where they are loaded")
    ls.add_argument("--json", action="store_true")
    rm = asub.add_parser("rm", help="remove an adapter (unloaded from every replica)")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--json", action="store_true")


def adapter_command(client: AdminClient, args: argparse.Namespace, cwd: Path) -> int:
    if args.action == "add":
        return add(client, args, cwd)
    if args.action == "ls":
        return list_adapters(client, as_json=args.json)
    res = client.call("DELETE", f"/v1/admin/adapters/{args.name}")
    print(json.dumps(res, indent=2, sort_keys=True) if args.json
          else f"adapter {args.name} removed (unloading from its replicas)")
    return EXIT_OK


def source_arg(source: str, cwd: Path) -> str:
    """A local directory as an absolute path (agents resolve it on their nodes, not in this shell's directory);
    anything else (a hub id) as given."""
    path = cwd / source
    return str(path.resolve()) if not source.startswith(("hf://", "modelscope://")) and path.is_dir() else source


def add(client: AdminClient, args: argparse.Namespace, cwd: Path) -> int:
    body: dict[str, Any] = {"name": args.name, "base": args.base, "source": source_arg(args.source, cwd)}
    if args.rank is not None:
        body["rank"] = args.rank
    res = client.call("POST", "/v1/admin/adapters", body)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    elif res["created"]:
        print(f"adapter {args.name} added on {args.base}; its replicas load it (nebula adapter ls shows where)")
    else:
        print(f"adapter {args.name} already exists with this base and source")
    return EXIT_OK


def list_adapters(client: AdminClient, *, as_json: bool) -> int:
    data = client.call("GET", "/v1/admin/adapters")["data"]
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    rows = []
    for a in data:
        problem = next(iter(sorted(a["errors"].items())), None)
        rows.append([a["name"], a["base"], str(a.get("rank") or "-"), f"{len(a['loaded_on'])}/{a['replicas']}",
                     a["source"], f"{problem[0]}: {problem[1]}" if problem else ""])
    print(table(rows, ["NAME", "BASE", "RANK", "LOADED", "SOURCE", "ERROR"]) if rows else "no adapters")
    return EXIT_OK
