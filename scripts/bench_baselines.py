"""The external baselines of scripts/bench_gateway.py (issue 18): vllm-router and nginx.

Nebula's CPU per request next to a minimal aiohttp proxy says how far the gateway is from the cheapest
Python hop; next to vllm-router (the Rust router the vLLM project ships) and nginx it says how far it is
from what an operator would otherwise put in front of vLLM. bench_gateway.py measures both as it measures
the others: one process (tree) in front of the same engine simulator, interleaved with the other targets,
CPU from /proc of the proxy's processes.

What each does to a request differs, which the ratios should be read with: nginx passes bytes on (it
reads the body whole, then relays the answer as it comes); vllm-router parses a chat request and sends
the engine its own serialisation (unknown fields kept, its defaults filled in), as the gateway parses the
body too; neither checks an API key, which the gateway does here (auth is on).

This module only finds the binaries, renders nginx's configuration and builds the command lines; the
benchmark starts, probes and stops the processes. A baseline that is not installed is skipped with the
reason (and how to install it) instead of failing the run: neither is a dependency of Nebula.

Both run under the conditions the other targets have, one event loop each (the gateway with its default
single worker, the aiohttp proxy): vllm-router with one tokio worker thread (TOKIO_WORKER_THREADS, which
tokio's runtime builder reads; the Python launcher's main thread only waits in `Router.start()`), nginx
with one worker process. The benchmark pins none of the targets to a core.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench_load import process_tree

# Where the benchmark looks for vllm-router when --vllm-router is not given: a venv of its own, so that the
# wheel's pins (fastapi, pydantic, ...) stay out of Nebula's environment.
VLLM_ROUTER_VENV = Path("/var/cache/nebula-dev/bench/vllm-router")
VLLM_ROUTER_INSTALL = f"python3 -m venv {VLLM_ROUTER_VENV} && {VLLM_ROUTER_VENV}/bin/pip install vllm-router"
NGINX_INSTALL = "apt-get install -y nginx-light"
# More idle upstream connections than the largest concurrency of any scenario (128): as the other proxies'
# unbounded pools, nginx then never closes a connection to the engine and opens a new one under load.
NGINX_UPSTREAM_KEEPALIVE = 256


@dataclass
class Baseline:
    """One external proxy, ready to start: `argv` with `env` serves the engine's API on `port`."""

    name: str  # the target's name in the tables: vllm_router, nginx
    label: str  # what ran, with its version, e.g. "vllm-router 0.1.17"
    argv: list[str]
    env: dict[str, str]
    port: int
    how: str  # how it runs (threads, processes), for the report


def find_vllm_router(option: str) -> tuple[Path | None, str]:
    """The vllm-router launcher to run: --vllm-router PATH (the launcher, or a venv holding it), else the
    benchmark's own venv, else one on PATH. (None, why) when there is none."""
    if option:
        path = Path(option)
        if path.is_dir():
            path = path / "bin" / "vllm-router"
        if path.is_file() and os.access(path, os.X_OK):
            return path, ""
        return None, f"--vllm-router {option}: no executable vllm-router there; to install it: {VLLM_ROUTER_INSTALL}"
    for candidate in (VLLM_ROUTER_VENV / "bin" / "vllm-router", shutil.which("vllm-router")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate), ""
    return None, f"vllm-router is not installed; to install it: {VLLM_ROUTER_INSTALL}"


def vllm_router_version(launcher: Path) -> str:
    """The wheel's version, from the dist-info beside the launcher's venv ('' when not found)."""
    venv = launcher.resolve().parent.parent
    for info in sorted(venv.glob("lib/python*/site-packages/vllm_router-*.dist-info")):
        return info.name.removeprefix("vllm_router-").removesuffix(".dist-info")
    return ""


def vllm_router(launcher: Path, host: str, port: int, engine_url: str, metrics_port: int,
                threads: int) -> Baseline:
    """vllm-router in front of the one engine. round_robin: with one worker every policy picks it, and this
    one keeps no per-request state (the default, cache_aware, keeps a prefix tree of every prompt). Its
    Prometheus exporter is on (as the gateway's /metrics is), on a port of its own so runs don't collide."""
    argv = [str(launcher), "--host", host, "--port", str(port), "--worker-urls", engine_url,
            "--policy", "round_robin", "--prometheus-host", host, "--prometheus-port", str(metrics_port)]
    env = dict(os.environ, TOKIO_WORKER_THREADS=str(threads))
    version = vllm_router_version(launcher)
    return Baseline(name="vllm_router", label=f"vllm-router {version or '(version unknown)'}", argv=argv,
                    env=env, port=port, how=f"TOKIO_WORKER_THREADS={threads}")


def find_nginx(option: str) -> tuple[Path | None, str]:
    """The nginx binary: --nginx PATH, else nginx on PATH or in /usr/sbin (not on a user's PATH)."""
    if option:
        if os.access(option, os.X_OK) and Path(option).is_file():
            return Path(option), ""
        return None, f"--nginx {option}: not an executable; to install nginx: {NGINX_INSTALL}"
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate), ""
    return None, f"nginx is not installed; to install it: {NGINX_INSTALL}"


def nginx_version(binary: Path) -> str:
    """'1.22.1' from `nginx -v` (which writes to stderr); '' when it says nothing of the kind."""
    try:
        out = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
    return m[1] if m else ""


def nginx_config(workdir: Path, host: str, port: int, upstream: str) -> str:
    """nginx as a plain reverse proxy, run by an unprivileged user's means: in the foreground, every path in
    `workdir` (nothing under /etc/nginx, /var/lib/nginx or /var/log), errors to stderr, no access log.

    - master_process on, worker_processes 1: the master only supervises; the one worker does the proxying.
    - an upstream with idle keepalive connections, HTTP/1.1 and an empty Connection header: connections to
      the engine are reused, as the other proxies' pools reuse theirs.
    - proxy_buffering off: each SSE chunk is passed on as it comes, not when a buffer fills.
    - client_body_buffer_size as large as client_max_body_size: request bodies are read into memory, never
      to a temp file (when the bench runs as root the worker is `nobody`, who could not enter the work dir);
      the body is still read whole before it goes upstream, as Nebula and the minimal proxy do.
    - keepalive_requests high on both sides: no connection is closed after 1000 requests (nginx's default).
    """
    d = workdir
    return f"""daemon off;
master_process on;
worker_processes 1;
error_log stderr warn;
pid {d}/nginx.pid;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_body_buffer_size 16m;
    client_max_body_size 16m;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;

    upstream engine {{
        server {upstream};
        keepalive {NGINX_UPSTREAM_KEEPALIVE};
        keepalive_requests 1000000;
    }}

    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx(binary: Path, workdir: Path, host: str, port: int, upstream: str) -> Baseline:
    """nginx with nginx_config() written to workdir/nginx.conf; -e stderr so that it does not first try
    to open the compiled-in error log (/var/log/nginx/error.log) before it reads the config."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, host, port, upstream))
    version = nginx_version(binary)
    return Baseline(name="nginx", label=f"nginx {version or '(version unknown)'}",
                    argv=[str(binary), "-p", str(workdir), "-c", str(conf), "-e", "stderr"],
                    env=dict(os.environ), port=port, how="master + 1 worker process")


def tree_size(pid: int) -> tuple[int, int]:
    """(processes, threads) of `pid` and its descendants, as /proc shows them now: the tree whose CPU is summed
    (bench_load.process_tree, cpu_times), so this says what a baseline's figure covers."""
    procs = threads = 0
    for each in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            threads += len(os.listdir(f"/proc/{each}/task"))
            procs += 1
    return procs, threads
