"""The figures of scripts/bench_gateway.py: one measurement's summary, the table per scenario, the summary
relative to vllm-router (issue 18), the goals (issue 3), and the summary of a py-spy profile."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_load import Scenario, pooled
from bench_stack import BASELINES, Stack


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    ok, wall = raw["ok"], raw["wall_s"] or float("nan")
    cpu = {k: v for k, v in raw["cpu_s"].items() if k != "engine"}
    hop_cpu = sum(cpu.values())
    system = raw.get("cpu_system_s")  # absent from a measurement made before the split
    return {"ok": ok, "errors": raw["errors"], "first_error": raw["first_error"],
            "rps": ok / wall, "tok_s": raw["tokens"] / wall,
            "ttft_p50": pct(raw["ttft_ms"], 50), "ttft_p99": pct(raw["ttft_ms"], 99),
            "total_p50": pct(raw["total_ms"], 50), "total_p99": pct(raw["total_ms"], 99),
            "cpu_ms_req": hop_cpu * 1000 / ok if ok else float("nan"),
            # Per token the engine sent (for a streamed answer, per SSE event relayed).
            "cpu_us_tok": hop_cpu * 1e6 / raw["tokens"] if raw["tokens"] else float("nan"),
            "cpu_ms_req_by": {k: v * 1000 / ok for k, v in cpu.items()} if ok else {},
            # The kernel's part of the hop's CPU (loopback TCP, epoll, wake-ups): cut only by fewer system calls.
            "cpu_kernel_share": (sum(v for k, v in system.items() if k != "engine") / hop_cpu
                                 if system and hop_cpu else float("nan")),
            "engine_cpu_ms_req": raw["cpu_s"].get("engine", 0.0) * 1000 / ok if ok else float("nan"),
            # --syscalls: the hop's system calls per request, by name, most made first.
            **({"syscalls_req": {k: v / ok for k, v in sorted(raw["syscalls"].items(), key=lambda kv: -kv[1])}}
               if "syscalls" in raw and ok else {})}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# Whose CPU is given as a ratio to vllm-router's, in the per-scenario tables and the summary.
RELATIVE = ("nebula", "nebula_ref", "nebula_asyncio", "nebula_uvloop", "proxy", "nginx", "proxy_uvloop",
            "tcp_relay")


def print_scenario(sc: Scenario, res: dict[str, dict[str, Any]], skipped: dict[str, str] | None = None
                   ) -> dict[str, float]:
    d, p, n = res["direct"], res["proxy"], res["nebula"]
    vr = res.get("vllm_router")
    timing = f"TTFT {sc.ttft_ms:g} ms, {sc.tpot_ms:g} ms/token" if sc.ttft_ms or sc.tpot_ms else "no delays"
    print(f"\n== {sc.name}: {'stream' if sc.stream else 'non-stream'}, {sc.tokens} tokens, {timing}, "
          f"concurrency {sc.concurrency} ==")
    print(f"{'target':<13}{'ok':>7}{'err':>5}{'req/s':>9}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}"
          f"{'+p50':>8}{'+p99':>8}{'CPU ms/req':>12}{'CPU us/tok':>12}{'/vllm-router':>14}  by process")
    for target, r in res.items():
        by = " ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_req_by"].items())
        if target != "direct" and not math.isnan(r["cpu_kernel_share"]):
            by += f" (kernel {r['cpu_kernel_share']:.0%})"
        cpu = f"{r['cpu_ms_req']:.3f}" if target != "direct" else "-"
        # Per streamed token only: a non-streamed answer's tokens are one body, whatever their count.
        tok = f"{r['cpu_us_tok']:.2f}" if sc.stream and target != "direct" else "-"
        rel = f"{ratio(r['cpu_ms_req'], vr['cpu_ms_req']):.2f}x" if vr and target != "direct" else "-"
        print(f"{target:<13}{r['ok']:>7}{r['errors']:>5}{r['rps']:>9.1f}{r['tok_s']:>9.0f}{r['ttft_p50']:>10.2f}"
              f"{r['ttft_p99']:>8.2f}{r['ttft_p50'] - d['ttft_p50']:>8.2f}{r['ttft_p99'] - d['ttft_p99']:>8.2f}"
              f"{cpu:>12}{tok:>12}{rel:>14}  {by}")
        if "syscalls_req" in r:
            calls = r["syscalls_req"]
            print(f"{'':13}system calls per request {sum(calls.values()):.2f}: "
                  + (", ".join(f"{k} {v:.2f}" for k, v in list(calls.items())[:5]) or "none counted"))
        if r["first_error"]:
            print(f"              first error: {r['first_error'][:200]}")
    for target, why in (skipped or {}).items():
        print(f"{target:<13}skipped: {why}")
    ratios = {"cpu_nebula_over_proxy": ratio(n["cpu_ms_req"], p["cpu_ms_req"]),
              "tok_s_nebula_over_direct": ratio(n["tok_s"], d["tok_s"]),
              "tok_s_proxy_over_direct": ratio(p["tok_s"], d["tok_s"]),
              "added_ttft_p99_nebula_ms": n["ttft_p99"] - d["ttft_p99"],
              "added_ttft_p99_proxy_ms": p["ttft_p99"] - d["ttft_p99"]}
    if "proxy_uvloop" in res:
        ratios["cpu_proxy_uvloop_over_proxy"] = ratio(res["proxy_uvloop"]["cpu_ms_req"], p["cpu_ms_req"])
    if "nebula_ref" in res:
        # --compare-src: this tree's gateway against the reference tree's, side by side in one run.
        ratios["cpu_nebula_over_nebula_ref"] = ratio(n["cpu_ms_req"], res["nebula_ref"]["cpu_ms_req"])
    for target in BASELINES:
        if target in res:
            ratios[f"added_ttft_p99_{target}_ms"] = res[target]["ttft_p99"] - d["ttft_p99"]
    relative = [t for t in RELATIVE if t in res] if vr is not None else []
    for target in relative:
        # Per request, and for a streamed answer per token: the two differ only if the targets' requests
        # carried different token counts (each request here streams the same number).
        ratios[f"cpu_{target}_over_vllm_router"] = ratio(res[target]["cpu_ms_req"], res["vllm_router"]["cpu_ms_req"])
        if sc.stream:
            ratios[f"cpu_tok_{target}_over_vllm_router"] = ratio(res[target]["cpu_us_tok"],
                                                                 res["vllm_router"]["cpu_us_tok"])
    print(f"ratios: CPU/req nebula/proxy {ratios['cpu_nebula_over_proxy']:.2f}x | tokens/s nebula/direct "
          f"{ratios['tok_s_nebula_over_direct']:.3f}x (proxy/direct {ratios['tok_s_proxy_over_direct']:.3f}x) | "
          f"added p99 TTFT nebula {ratios['added_ttft_p99_nebula_ms']:+.2f} ms "
          f"(proxy {ratios['added_ttft_p99_proxy_ms']:+.2f} ms"
          + "".join(f", {t} {ratios[f'added_ttft_p99_{t}_ms']:+.2f} ms" for t in BASELINES if t in res) + ")"
          + (f" | CPU/req proxy_uvloop/proxy {ratios['cpu_proxy_uvloop_over_proxy']:.2f}x"
             if "cpu_proxy_uvloop_over_proxy" in ratios else "")
          + (f" | CPU/req nebula/nebula_ref {ratios['cpu_nebula_over_nebula_ref']:.3f}x"
             if "cpu_nebula_over_nebula_ref" in ratios else "")
          + (" | CPU/req over vllm-router: "
             + ", ".join(f"{t} {ratios[f'cpu_{t}_over_vllm_router']:.2f}x" for t in relative) if relative else ""))
    return ratios


def round_ratios(sc: Scenario, raws: dict[str, list[dict[str, Any]]], rounds: int) -> dict[str, list[float]]:
    """--rounds: each target's CPU per request (per token for a stream) over vllm-router's, round by round (a
    target measured twice a round, as nebula with --compare-src, pooled within it). Empty with one round or
    without vllm-router."""
    if rounds < 2 or "vllm_router" not in raws:
        return {}
    key = "cpu_us_tok" if sc.stream else "cpu_ms_req"

    def by_round(each: list[dict[str, Any]]) -> list[float]:
        assert len(each) % rounds == 0, f"{len(each)} measurements in {rounds} rounds"
        size = len(each) // rounds
        return [summarize(pooled(each[r * size:(r + 1) * size]))[key] for r in range(rounds)]

    base = by_round(raws["vllm_router"])
    return {t: [ratio(a, b) for a, b in zip(by_round(raws[t]), base, strict=True)] for t in RELATIVE if t in raws}


def print_rounds(sc: Scenario, raws: dict[str, list[dict[str, Any]]], rounds: int) -> None:
    """The spread behind a pooled ratio: how far one round's figure may stray from the next on this box."""
    if rounds > 1 and "vllm_router" not in raws:
        print("by round: no ratios without vllm-router")
    for target, each in round_ratios(sc, raws, rounds).items():
        print(f"{target}/vllm-router by round: " + " ".join(f"{r:.2f}" for r in each)
              + f" (median {statistics.median(each):.2f})")


def print_relative(chosen: Sequence[Scenario], results: dict[str, dict[str, dict[str, Any]]],
                   stack: Stack) -> None:
    """The issue-18 summary: per scenario, vllm-router's CPU per request (and per streamed token) and each
    other hop's as value (ratio to vllm-router's); with vllm-router skipped, the values alone."""
    cols = [t for t in RELATIVE if any(t in r for r in results.values()) or t in stack.skipped]
    print("\n== CPU per request and per streamed token, relative to vllm-router (issue 18) ==")
    print(f"{'scenario':<24}{'unit':<12}{'vllm-router':>12}" + "".join(f"{t:>20}" for t in cols))
    for sc in chosen:
        res = results.get(sc.name)
        if not res:
            continue
        units = [("ms/request", "cpu_ms_req")] + ([("us/token", "cpu_us_tok")] if sc.stream else [])
        for unit, key in units:
            vr = res["vllm_router"][key] if "vllm_router" in res else None
            cells = []
            for t in cols:
                if t not in res:
                    cells.append("skipped")
                    continue
                value = res[t][key]
                cells.append(f"{value:.3f} ({ratio(value, vr):.2f}x)" if vr is not None else f"{value:.3f} (-)")
            print(f"{sc.name:<24}{unit:<12}{f'{vr:.3f}' if vr is not None else 'skipped':>12}"
                  + "".join(f"{c:>20}" for c in cells))
    for target, label in stack.labels.items():
        print(f"{target}: {label}")
    for target, why in stack.skipped.items():
        print(f"{target} skipped: {why}")


def goals_of(ratios: dict[str, dict[str, float]]) -> dict[str, tuple[float, str, bool]]:
    out: dict[str, tuple[float, str, bool]] = {}
    cpu = [r["cpu_nebula_over_proxy"] for r in ratios.values()]
    if cpu:
        out["CPU/req nebula/proxy (worst scenario)"] = (max(cpu), "<= 1.0", max(cpu) <= 1.0)
    for name in ("stream32_c64", "nonstream32_c64"):
        if name in ratios:
            v = ratios[name]["added_ttft_p99_nebula_ms"]
            out[f"added p99 TTFT ms, {name}"] = (v, "<= 2 ms", v <= 2.0)
    if "realistic_c128" in ratios:
        v = ratios["realistic_c128"]["tok_s_nebula_over_direct"]
        out["tokens/s nebula/direct, realistic_c128"] = (v, ">= 0.97", v >= 0.97)
    return out


def profile_summary(path: Path, top: int) -> None:
    """Print where a py-spy raw profile (`frame;frame;... count` lines) spends its samples: by leaf
    function (self), by function anywhere on the stack (inclusive), and by the library of the leaf."""
    import re
    from collections import Counter

    frame_re = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            m = frame_re.match(frame)
            fn, file = (m["fn"], m["file"]) if m else (frame, "?")
            names.append(f"{fn} ({file.rsplit('site-packages/', 1)[-1].rsplit('/nebula/', 1)[-1]})")
        self_c[names[-1]] += n
        libs[_library(names[-1])] += n
        for name in set(names):
            incl[name] += n
    print(f"== {path.name}: {total} samples ==")
    for title, counter in (("self", self_c), ("inclusive", incl), ("leaf by library", libs)):
        print(f"-- {title} --")
        for name, n in counter.most_common(top):
            print(f"{100 * n / max(total, 1):6.1f}%  {name}")


def _library(frame: str) -> str:
    file = frame.rsplit("(", 1)[-1].rstrip(")")
    for lib in ("aiohttp", "yarl", "multidict", "prometheus_client", "grpc", "aetcd", "asyncio", "json",
                "logging", "services", "core", "adapters"):
        if file.startswith(lib + "/") or f"/{lib}/" in file:
            return lib
    return file
