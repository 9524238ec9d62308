"""`nebula keys create | list | revoke`: API keys through the admin API (/v1/admin/keys).

`create` prints the new token alone on stdout (so `KEY=$(nebula keys create ci)` works) and what it may do
on stderr; the token is shown this once, the gateway keeps only its digest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from nebula.cli.client import EXIT_FAILURE, EXIT_NOT_FOUND, AdminClient, CliError
from nebula.cli.views import table

KEY_ID_LEN = 16


def add_keys_parser(sub: Any) -> None:
    k = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = ksub.add_parser("create", help="create a key; prints its token once")
    c.add_argument("name", help="what the key is for, e.g. 'team-a ci'")
    c.add_argument("--scope", action="append", choices=["inference", "admin"], dest="scopes",
                   help="what it opens (repeatable; default: inference)")
    c.add_argument("--model", action="append", dest="models", metavar="MODEL",
                   help="allow only this model (repeatable; default: every model)")
    c.add_argument("--rpm", type=int, metavar="N", help="at most N requests per minute (per gateway)")
    c.add_argument("--max-concurrent", type=int, metavar="N", help="at most N requests in flight (per gateway)")
    c.add_argument("--json", action="store_true")
    ls = ksub.add_parser("list", help="keys (never their tokens)")
    ls.add_argument("--json", action="store_true")
    rv = ksub.add_parser("revoke", help="revoke a key by id, or by name when only one key has it")
    rv.add_argument("key", metavar="ID_OR_NAME")
    rv.add_argument("--json", action="store_true")


def keys_command(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "create":
        return create(client, args)
    if args.action == "list":
        return list_keys(client, as_json=args.json)
    return revoke(client, args.key, as_json=args.json)


def create(client: AdminClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "scopes": args.scopes or ["inference"]}
    if args.models:
        body["models"] = args.models
    limits = {k: v for k, v in (("requests_per_minute", args.rpm), ("max_concurrent", args.max_concurrent))
              if v is not None}
    if limits:
        body["limits"] = limits
    key = client.call("POST", "/v1/admin/keys", body)
    if args.json:
        print(json.dumps(key, indent=2, sort_keys=True))
        return 0
    print(key["key"])
    print(f"created key {key['id']} ({key['name']}): {_summary(key)}. The token above is shown only now; "
          f"revoke it with `nebula keys revoke {key['id']}`.", file=sys.stderr)
    return 0


def _summary(key: dict[str, Any]) -> str:
    parts = ["scopes " + ",".join(key.get("scopes") or [])]
    parts.append("models " + (",".join(key["models"]) if key.get("models") else "all"))
    limits = key.get("limits") or {}
    if limits.get("requests_per_minute"):
        parts.append(f"{limits['requests_per_minute']}/min")
    if limits.get("max_concurrent"):
        parts.append(f"{limits['max_concurrent']} in flight")
    return "; ".join(parts)


def _created(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def list_keys(client: AdminClient, *, as_json: bool) -> int:
    keys = client.call("GET", "/v1/admin/keys")["data"]
    if as_json:
        print(json.dumps(keys, indent=2, sort_keys=True))
    elif not keys:
        print("no API keys: the gateway needs none (create one with `nebula keys create NAME`)")
    else:
        limits = [k.get("limits") or {} for k in keys]
        rows = [[k["id"], k["name"], ",".join(k.get("scopes") or []), ",".join(k.get("models") or []) or "all",
                 str(lim.get("requests_per_minute") or "-"), str(lim.get("max_concurrent") or "-"),
                 _created(k.get("created") or 0), k.get("source", "")] for k, lim in zip(keys, limits, strict=True)]
        print(table(rows, ["ID", "NAME", "SCOPES", "MODELS", "RPM", "CONCURRENT", "CREATED", "SOURCE"]))
    return 0


def _resolve(client: AdminClient, key: str) -> str:
    """An id as is; otherwise the id of the one stored key with that name."""
    if len(key) == KEY_ID_LEN and all(c in "0123456789abcdef" for c in key):
        return key
    stored = [k for k in client.call("GET", "/v1/admin/keys")["data"] if k.get("source") != "config"]
    named = [k["id"] for k in stored if k["name"] == key]
    if not named:
        raise CliError(f"no API key with id or name '{key}' (see `nebula keys list`)", EXIT_NOT_FOUND)
    if len(named) > 1:
        raise CliError(f"{len(named)} keys are named '{key}'; revoke one by id: {', '.join(named)}", EXIT_FAILURE)
    return str(named[0])


def revoke(client: AdminClient, key: str, *, as_json: bool) -> int:
    if key.startswith("config:"):
        raise CliError(f"key {key} comes from the config file; remove its digest there and restart the gateway",
                       EXIT_FAILURE)
    key_id = _resolve(client, key)
    result = client.call("DELETE", f"/v1/admin/keys/{key_id}")
    print(json.dumps(result, indent=2, sort_keys=True) if as_json else f"key {key_id} revoked")
    return 0
