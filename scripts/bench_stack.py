"""The processes of one scripts/bench_gateway.py run: the engine simulator and the minimal proxy, etcd and
Nebula's gateway (with the simulator registered as a READY replica), second gateways measured beside the
first (another event loop, another tree), and the external baselines (bench_baselines.py); and `Processes`,
which starts them with their logs in the run's work dir and stops them in reverse order.

Nebula's own modules come from the tree given by BENCH_NEBULA_SRC (--nebula-src), else this checkout; the
entry script puts that tree on sys.path before importing this module."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import bench_baselines
from bench_engine import HOST, MODEL, PATH

from nebula.core import keys
from nebula.core.model import InstanceStatus, ModelSpec, Phase, dumps

API_KEY = "bench-inference-key"
# The script every role runs as (engine, proxy, loadgen, service): the benchmark's entry point.
ENTRY = Path(__file__).resolve().with_name("bench_gateway.py")

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Children get SIGTERM if this script dies without cleaning up (even on SIGKILL); Linux only.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """Every process this run started; `stop_all` ends them (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              stdout: int | IO[bytes] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as log:
            # Own session: Ctrl-C reaches only this script, which then stops the children in order.
            proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, cwd=cwd,
                                    stdout=log if stdout is None else stdout, stderr=log,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout_s: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def log_tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def wait_until(check: Any, timeout_s: float, what: str, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc = procs.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{procs.log_tail(name)}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}:\n{procs.log_tail(name)}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((HOST, port)) == 0


def http_ok(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bool:
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def etcd_put(endpoint: str, key: str, value: bytes) -> None:
    # etcd's JSON gateway: no gRPC client needed in this script.
    payload = json.dumps({"key": b64encode(key.encode()).decode(), "value": b64encode(value).decode()}).encode()
    req = urllib.request.Request(endpoint + "/v3/kv/put", data=payload, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


@dataclass
class Stack:
    engine_url: str
    proxy_url: str
    gateway_url: str
    pids: dict[str, dict[str, int]]  # target -> {process name: pid} whose CPU counts
    extra_url: dict[str, str] = field(default_factory=dict)  # optional targets (--uvloop-proxy, baselines)
    labels: dict[str, str] = field(default_factory=dict)  # baseline -> what ran, e.g. "nginx 1.22.1, ..."
    skipped: dict[str, str] = field(default_factory=dict)  # baseline -> why it was not measured


def two_hop_config(ports: dict[str, int]) -> str:
    """The config lines of a two-hop tree: where the gateway finds the router, and the router's port."""
    port = ports["router"]
    return f'router_url = "http://{HOST}:{port}"\n\n[router]\nport = {port}\n'


@dataclass(frozen=True)
class StackOptions:
    """What a run starts besides the engine, the proxy, etcd and one gateway."""

    src: Path  # the tree Nebula's services run from
    profile_dir: Path | None = None  # where each service writes its cProfile (unless `sampled`)
    sampled: bool = False  # py-spy samples the services from outside: they run as they are
    uvloop_proxy: bool = False  # the minimal proxy on uvloop too (target proxy_uvloop)
    tcp_relay: bool = False  # the byte relay, the floor of a Python data plane (target tcp_relay)
    gateway_workers: int = 1
    gateway_loop: str = "uvloop"
    compare_loops: bool = False  # a second gateway on the other event loop (nebula_asyncio or nebula_uvloop)
    compare_src: Path | None = None  # a second gateway from this tree (target nebula_ref)


PROBE = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def start_etcd(procs: Processes, workdir: Path, binary: str = "") -> str:
    """A one-member etcd in the run's work dir (`binary`, default the one on PATH); its client URL once it
    answers /health."""
    etcd_bin = binary or shutil.which("etcd")
    if not etcd_bin:
        raise RuntimeError("the etcd binary is not on PATH")
    etcd_url, peer = f"http://{HOST}:{free_port()}", f"http://{HOST}:{free_port()}"
    # Every ETCD_* variable would be read by etcd as a flag.
    etcd_env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    procs.start("etcd", [etcd_bin, "--name", "bench", "--data-dir", str(workdir / "etcd"),
                         "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                         "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new"], env=etcd_env)
    wait_until(lambda: http_ok(etcd_url + "/health"), 20, "etcd /health", procs, "etcd")
    return etcd_url


def register_engine(etcd_url: str, engine_url: str) -> None:
    """Register `engine_url` as the READY replica of the model, as a node agent would."""
    etcd_put(etcd_url, keys.model_key(MODEL), dumps(ModelSpec(name=MODEL, source="/bench").to_dict()))
    status = InstanceStatus(instance=MODEL, model=MODEL, node="bench-node", phase=Phase.READY,
                            endpoint=engine_url, since=time.time())
    etcd_put(etcd_url, keys.instance_key(MODEL), dumps(status.to_dict()))


def gateway_env(workdir: Path, etcd_url: str, port: int, workers: int = 1, loop: str = "uvloop",
                extra: str = "") -> dict[str, str]:
    """The environment of a gateway on `port` (inference key API_KEY, `workers` processes): its config file
    written to the work dir, NEBULA_CONFIG naming it; `extra`: config lines after [gateway]'s own (keys of
    [gateway], then any sections of their own, as two_hop_config's)."""
    config = workdir / f"nebula-{port}.toml"
    key_hash = hashlib.sha256(API_KEY.encode()).hexdigest()
    config.write_text(f"""
[cluster]
etcd_endpoints = ["{etcd_url}"]

[gateway]
port = {port}
api_key_hashes = ["{key_hash}"]
admin_key_hashes = ["{hashlib.sha256(b'bench-admin-key').hexdigest()}"]
{f"workers = {workers}" if workers > 1 else ""}
event_loop = "{loop}"
{extra}
[log]
level = "info"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEBULA_", "ETCD_"))}
    env["NEBULA_CONFIG"] = str(config)
    return env


def start_stack(procs: Processes, workdir: Path, opts: StackOptions) -> Stack:
    py, me, src = sys.executable, str(ENTRY), opts.src
    ports = {name: free_port() for name in ("engine", "proxy", "router", "gateway")}
    # A tree from before routing moved into the gateway needs its router service (and its config).
    hops = ("router", "gateway") if _two_hop(src) else ("gateway",)
    engine_url = f"http://{HOST}:{ports['engine']}"
    engine = procs.start("engine", [py, me, "engine", "--port", str(ports["engine"])])
    proxy = procs.start("proxy", [py, me, "proxy", "--port", str(ports["proxy"]), "--upstream", engine_url])
    etcd_url = start_etcd(procs, workdir)
    env = gateway_env(workdir, etcd_url, ports["gateway"], opts.gateway_workers, opts.gateway_loop,
                      two_hop_config(ports) if "router" in hops else "")
    wait_until(lambda: http_ok(engine_url + "/health"), 20, "engine /health", procs, "engine")
    register_engine(etcd_url, engine_url)

    services: dict[str, int] = {}
    for svc in hops:
        argv = ([py, "-m", "nebula", svc, "run"] if opts.profile_dir is None or opts.sampled
                else [py, me, "service", svc, "--out", str(opts.profile_dir / f"{svc}.pstats")])
        services[svc] = procs.start(svc, argv, env=from_tree(env, src), cwd=src).pid

    gateway_url = f"http://{HOST}:{ports['gateway']}"
    # Ready once a request crosses Nebula to the engine (the instance watch has seen the instance).
    wait_until(lambda: http_ok(gateway_url + PATH, PROBE, AUTH), 30, "a request through Nebula", procs, "gateway")
    stack = Stack(engine_url=engine_url, proxy_url=f"http://{HOST}:{ports['proxy']}", gateway_url=gateway_url,
                  pids={"direct": {}, "proxy": {"proxy": proxy.pid}, "nebula": services,
                        "_engine": {"engine": engine.pid}})
    if opts.uvloop_proxy:
        # The same minimal proxy on uvloop, measured in the same run: what the event loop alone buys a hop.
        port = free_port()
        uv = procs.start("proxy_uvloop", [py, me, "proxy", "--port", str(port), "--upstream", engine_url,
                                          "--uvloop"])
        stack.extra_url["proxy_uvloop"] = f"http://{HOST}:{port}"
        stack.pids["proxy_uvloop"] = {"proxy_uvloop": uv.pid}
        wait_until(lambda: port_open(port), 20, "uvloop proxy", procs, "proxy_uvloop")
    if opts.tcp_relay:
        port = free_port()
        host, engine_port = engine_url.removeprefix("http://").split(":")
        relay = procs.start("tcp_relay", [py, me, "relay", "--port", str(port), "--upstream-host", host,
                                          "--upstream-port", engine_port])
        stack.extra_url["tcp_relay"] = f"http://{HOST}:{port}"
        stack.pids["tcp_relay"] = {"tcp_relay": relay.pid}
        wait_until(lambda: port_open(port), 20, "byte relay", procs, "tcp_relay")
    if opts.compare_loops and hops == ("gateway",):
        # The same gateway on the other event loop: what the loop is worth is a few percent, less than the
        # spread between runs on a shared box.
        other = "asyncio" if opts.gateway_loop == "uvloop" else "uvloop"
        _second_gateway(procs, stack, f"nebula_{other}", env | {"NEBULA_GATEWAY_EVENT_LOOP": other}, src)
    if opts.compare_src is not None:
        # Another tree's gateway on the same etcd and engine: a change against the commit before it.
        _second_gateway(procs, stack, "nebula_ref", env, opts.compare_src)
    return stack


def _two_hop(src: Path) -> bool:
    return (src / "nebula" / "services" / "router").is_dir()


def from_tree(env: dict[str, str], src: Path) -> dict[str, str]:
    """`env` for a service run from the tree `src` (with cwd=src too: `python -m` puts the working directory
    first on sys.path)."""
    return env | {"PYTHONPATH": str(src) + os.pathsep + env.get("PYTHONPATH", ""), "BENCH_NEBULA_SRC": str(src)}


def _second_gateway(procs: Processes, stack: Stack, target: str, env: dict[str, str], src: Path) -> None:
    """A gateway beside the first, with its config but its own port, measured in the same run as `target`."""
    if _two_hop(src):
        raise RuntimeError(f"{src} has the separate router: compare it with --nebula-src in a run of its own")
    port = free_port()
    name = f"gateway_{target.removeprefix('nebula_')}"
    proc = procs.start(name, [sys.executable, "-m", "nebula", "gateway", "run"],
                       env=from_tree(env | {"NEBULA_GATEWAY_PORT": str(port)}, src), cwd=src)
    url = f"http://{HOST}:{port}"
    wait_until(lambda: http_ok(url + PATH, PROBE, AUTH), 30, f"a request through {target}", procs, name)
    stack.extra_url[target] = url
    stack.pids[target] = {name: proc.pid}


# The external baselines (scripts/bench_baselines.py), in the order they run and are shown; CPU ratios are
# given against the first.
BASELINES = ("vllm_router", "nginx")


def baselines_of(option: str) -> list[str]:
    """--baselines' names (vllm-router or vllm_router, nginx), in BASELINES' order."""
    names = {b.strip().replace("-", "_") for b in option.split(",") if b.strip()}
    if names - set(BASELINES):
        raise SystemExit(f"--baselines: unknown {', '.join(sorted(names - set(BASELINES)))} "
                         f"(known: vllm-router, nginx)")
    return [b for b in BASELINES if b in names]


def start_baselines(procs: Processes, stack: Stack, workdir: Path, args: argparse.Namespace) -> None:
    """Start the baselines --baselines asks for in front of the stack's engine, and add them to `stack`
    as targets; one not installed, or not answering, goes to `stack.skipped` with the reason instead."""
    for name in baselines_of(args.baselines):
        if name == "vllm_router":
            path, why = bench_baselines.find_vllm_router(args.vllm_router)
            if path is not None:
                start_baseline(procs, stack, bench_baselines.vllm_router(
                    path, HOST, free_port(), stack.engine_url, free_port(), args.vllm_router_threads))
        else:
            path, why = bench_baselines.find_nginx(args.nginx)
            if path is not None:
                start_baseline(procs, stack, bench_baselines.nginx(
                    path, workdir / "nginx", HOST, free_port(), stack.engine_url.removeprefix("http://")))
        if path is None:
            stack.skipped[name] = why
        if name in stack.skipped:
            print(f"{name} skipped: {stack.skipped[name]}", flush=True)


def start_baseline(procs: Processes, stack: Stack, baseline: bench_baselines.Baseline) -> None:
    proc = procs.start(baseline.name, baseline.argv, env=baseline.env)
    url = f"http://{HOST}:{baseline.port}"
    try:
        # Ready once a request crosses it to the engine (vllm-router first waits for the engine's /health).
        wait_until(lambda: http_ok(url + PATH, PROBE, {"Content-Type": "application/json"}), 60,
                   f"a request through {baseline.label}", procs, baseline.name)
    except RuntimeError as e:
        procs.stop(baseline.name)
        stack.skipped[baseline.name] = (f"{baseline.label} did not come up: {str(e).splitlines()[0]} "
                                        f"(log: {procs.workdir / baseline.name}.log)")
        return
    stack.extra_url[baseline.name] = url
    stack.pids[baseline.name] = {baseline.name: proc.pid}
    stack.labels[baseline.name] = f"{baseline.label}, {baseline.how}"


def describe_baselines(stack: Stack) -> str:
    """What each baseline is and what its CPU figure covers (processes, threads), as /proc shows them now."""
    parts = []
    for name, label in stack.labels.items():
        nproc, nthreads = bench_baselines.tree_size(stack.pids[name][name])
        parts.append(f"{name} = {label} ({nproc} process{'es' if nproc != 1 else ''}, {nthreads} threads)")
    return "; ".join(parts)
