"""`nebula update MODEL ...` (a rolling replace, printed until done or rolled back) and `nebula node drain |
undrain NODE`: the admin API's update_api.py and drain_api.py, for people (or as JSON for scripts)."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Callable
from typing import Any, TextIO

from nebula.cli.client import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, AdminClient, CliError

NODE_ACTIONS = ("drain", "undrain")


def add_update_parser(sub: Any) -> None:
    u = sub.add_parser("update", help="change a model's revision, engine flags or runtime with a rolling replace "
                       "(one new replica ready before an old one drains; rolls back if a new one fails)")
    u.add_argument("name")
    u.add_argument("--revision", help="the source's new revision (a hub branch, tag or commit)")
    u.add_argument("--engine-args", help="the new `vllm serve` arguments, all of them, as one shell-quoted string "
                   "('' clears them)")
    u.add_argument("--engine-arg", action="append", default=None, dest="engine_arg",
                   help="one new `vllm serve` argument (repeatable; replaces the whole list)")
    u.add_argument("--engine-runtime", help="the engine runtime to move to (e.g. vllm-0.32-cu13)")
    u.add_argument("--max-model-len", type=int)
    u.add_argument("--no-wait", action="store_true", help="start the update and return")
    u.add_argument("--json", action="store_true")


def add_drain_parsers(nsub: Any) -> None:
    d = nsub.add_parser("drain", help="move a node's replicas away (replacement ready first) and place nothing new "
                        "there")
    d.add_argument("node")
    d.add_argument("--force", action="store_true",
                   help="drain even when a model could then run nowhere (its replicas there stop)")
    d.add_argument("--json", action="store_true")
    ud = nsub.add_parser("undrain", help="let a drained node take replicas again")
    ud.add_argument("node")
    ud.add_argument("--json", action="store_true")


def update_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.revision is not None:
        body["revision"] = args.revision
    if args.engine_args is not None and args.engine_arg is not None:
        raise CliError("give --engine-args or --engine-arg, not both", EXIT_USAGE)
    if args.engine_args is not None:
        try:
            body["engine_args"] = shlex.split(args.engine_args)
        except ValueError as e:
            raise CliError(f"--engine-args: {e}", EXIT_USAGE) from None
    if args.engine_arg is not None:
        body["engine_args"] = list(args.engine_arg)
    if args.engine_runtime is not None:
        body["engine_runtime"] = args.engine_runtime
    if args.max_model_len is not None:
        body["max_model_len"] = args.max_model_len
    if not body:
        raise CliError("nothing to update: give --revision, --engine-args, --engine-arg, --engine-runtime or "
                       "--max-model-len", EXIT_USAGE)
    return body


def update(client: AdminClient, args: argparse.Namespace, out: TextIO, *, sleep: Callable[[float], None] = time.sleep,
           poll_s: float = 1.0) -> int:
    name = args.name
    res = client.call("PATCH", f"/v1/admin/models/{name}", update_body(args))
    if not res.get("updated"):
        _say(out, args.json, res, f"model {name}: no change")
        return EXIT_OK
    if args.no_wait:
        _say(out, args.json, res, f"model {name} updating ({res['changes']}); follow it with `nebula status`")
        return EXIT_OK
    if not args.json:
        print(f"model {name} updating: {res['changes']}", file=out, flush=True)
    last = ""
    while True:
        sleep(poll_s)
        r = client.call("GET", f"/v1/admin/models/{name}/rollout")
        st = r.get("status") or {}
        if r["text"] != last and not args.json:
            print(f"  {r['text']}", file=out, flush=True)
        last = r["text"]
        if r["in_progress"] or (st.get("state") == "rolling" and st.get("target") == res["target"]):
            continue
        if st.get("target") != res["target"] and st.get("reason"):  # replicas already replaced are rolling back
            raise CliError(f"model {name} rolled back: {st['reason']} (see `nebula logs {name}`)", EXIT_FAILURE)
        if st.get("target") != res["target"]:
            raise CliError(f"the update of {name} ended without a result (was the model unloaded?)")
        if args.json:
            print(json.dumps(r, indent=2, sort_keys=True), file=out)
        if st["state"] == "done":
            if not args.json:
                print(f"model {name} updated: {st['replaced']}/{st['total']} replicas replaced", file=out)
            return EXIT_OK
        raise CliError(f"model {name} {r['text']} (see `nebula logs {name}`)", EXIT_FAILURE)


def node_command(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "drain":
        res = client.call("POST", f"/v1/admin/nodes/{args.node}/drain", {"force": bool(args.force)})
        stopping = "; stopping now: " + "; ".join(res["stopping"]) if res["stopping"] else ""
        _say(out, args.json, res, f"node {args.node} draining: its replicas move away, ready first{stopping} "
             "(`nebula status` shows when it is drained)")
    else:
        res = client.call("DELETE", f"/v1/admin/nodes/{args.node}/drain")
        _say(out, args.json, res, f"node {args.node} undrained: it takes replicas again")
    return EXIT_OK


def _say(out: TextIO, as_json: bool, res: object, line: str) -> None:
    print(json.dumps(res, indent=2, sort_keys=True) if as_json else line, file=out)
