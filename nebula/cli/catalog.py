"""`nebula catalog [search WORDS] [--variants] [--json]`: the gateway's model catalog, for people or scripts."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from nebula.cli.client import EXIT_NOT_FOUND, EXIT_OK, AdminClient, CliError
from nebula.cli.views import table

ENTRY_HEADER = ["NAME", "SIZES", "QUANTS", "TASK", "WEIGHTS GiB", "DESCRIPTION"]
VARIANT_HEADER = ["LOAD AS", "SIZE", "QUANT", "TASK", "WEIGHTS GiB", "SOURCE"]


def add_catalog_parser(sub: Any) -> None:
    c = sub.add_parser("catalog", help="models you can load by name (`nebula load qwen2.5-7b-instruct`)",
                       description="List the gateway's model catalog, or the entries matching every word "
                       "(`nebula catalog search qwen 7b`).")
    c.add_argument("words", nargs="*", metavar="[search] WORDS", help="only entries matching all these words")
    c.add_argument("-v", "--variants", action="store_true", help="a row per variant (size and quant) with its "
                   "name to load and its hub repo")
    c.add_argument("--json", action="store_true")


def query_words(words: Sequence[str]) -> list[str]:
    """`catalog search qwen 7b` and `catalog qwen 7b` both search for qwen and 7b."""
    return list(words[1:] if words and words[0] == "search" else words)


def gib(value: float) -> str:
    return f"{value:.1f}" if value >= 0.95 else f"{value:.2g}"


def clipped(text: str, width: int = 72) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def weights_range(entry: Mapping[str, Any]) -> str:
    sizes = [float(v.get("weights_gib") or 0) for v in entry.get("variants") or []]
    sizes = [s for s in sizes if s > 0]
    if not sizes:
        return "-"
    low, high = min(sizes), max(sizes)
    return gib(low) if low == high else f"{gib(low)}-{gib(high)}"


def entry_rows(entries: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[e["name"], ",".join(e.get("sizes") or []), ",".join(e.get("quants") or []), str(e.get("task", "-")),
             weights_range(e), clipped(str(e.get("description") or ""))] for e in entries]


def variant_rows(entries: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for e in entries:
        for v in e.get("variants") or []:
            source = v["source"] + (f"@{v['revision']}" if v.get("revision") else "")
            rows.append([v["name"], v["size"], v["quant"], str(e.get("task", "-")),
                         gib(float(v.get("weights_gib") or 0)) if v.get("weights_gib") else "-", source])
    return rows


def catalog_command(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    words = query_words(args.words)
    path = "/v1/admin/catalog" + (f"?{urllib.parse.urlencode({'q': ' '.join(words)})}" if words else "")
    entries = client.call("GET", path)["data"]
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True), file=out)
        return EXIT_OK
    if not entries:
        if words:
            raise CliError(f"no catalog entry matches {' '.join(words)!r} (`nebula catalog` lists them all)",
                           EXIT_NOT_FOUND)
        print("the catalog is empty (see [catalog] files)", file=out)
        return EXIT_OK
    if args.variants:
        print(table(variant_rows(entries), VARIANT_HEADER), file=out)
    else:
        print(table(entry_rows(entries), ENTRY_HEADER), file=out)
        print("\nload by name: `nebula load NAME --size SIZE [--quant QUANT]`, or by a variant's own name "
              "(`nebula catalog -v` lists them)", file=out)
    return EXIT_OK
