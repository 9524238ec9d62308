"""What every Nebula service does the same way: read config, open the store, serve /metrics, feed the watchdog."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nebula.adapters.sdnotify import Notifier
from nebula.core.config import NebulaConfig, merge_tables, parse_config
from nebula.core.store import Store
from nebula.errors import ConfigError, PermanentError

if TYPE_CHECKING:
    from nebula.adapters.etcd_connection import EtcdSecurity

DEFAULT_CONFIG = "/etc/nebula/nebula.toml"
log = logging.getLogger("nebula.runtime")


def config_path(env: Mapping[str, str], explicit: str | None = None) -> Path:
    return Path(explicit or env.get("NEBULA_CONFIG", DEFAULT_CONFIG))


def load_config(env: Mapping[str, str], explicit: str | None = None, *,
                skip_unreadable: bool = False) -> NebulaConfig:
    """The main file (absent: defaults), then `nebula.d/*.toml` drop-ins in name order, then NEBULA_* env.

    `skip_unreadable` is for engines, which run as their own user: a file they may not read (a drop-in with
    the etcd password, 0640 root:nebula) is none of their business, and is skipped with a line on stderr.
    """
    import tomllib

    path = config_path(env, explicit)
    data: dict[str, object] = {}
    files = []
    if path.exists():
        files.append(path)
    elif explicit:
        raise ConfigError("", f"{path}: no such config file (create one with `nebula config init`)")
    dropins = path.parent / "nebula.d"
    if dropins.is_dir():
        files += sorted(dropins.glob("*.toml"))
    for f in files:
        try:
            data = merge_tables(data, tomllib.loads(f.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as e:
            raise ConfigError("", f"{f}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                              f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {f}`") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("", f"{f}: not valid TOML: {e}") from None
        except PermissionError:
            if not skip_unreadable:
                raise ConfigError("", f"{f}: cannot read: permission denied") from None
            print(f"nebula: {f}: not readable by this user; its settings do not apply here", file=sys.stderr)
        except OSError as e:
            raise ConfigError("", f"{f}: cannot read: {e.strerror}") from None
    return parse_config(data, env, str(path))


def node_name(cfg: NebulaConfig) -> str:
    return cfg.node.name or os.uname().nodename.split(".")[0].lower()


def metrics_route(registry: CollectorRegistry) -> web.RouteDef:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return web.get("/metrics", metrics)


@asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> AsyncIterator[int]:
    """/metrics alone on host:port (0: a free port) for the block's duration; yields the port it got."""
    runner = web.AppRunner(web.Application(), access_log=None, handle_signals=False)
    runner.app.add_routes([metrics_route(registry)])
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        log.info("metrics on %s:%d", host, bound)
        yield int(bound)
    finally:
        await runner.cleanup()


async def notify_ready_and_watch(notifier: Notifier, healthy: Callable[[], bool],
                                 status: Callable[[], str] | None = None) -> None:
    """READY=1 now, then WATCHDOG=1 every half watchdog interval while `healthy()` holds."""
    notifier.notify(READY=1, STATUS=status() if status else "running")
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    while True:
        await asyncio.sleep(interval)
        if healthy():
            fields: dict[str, str | int] = {"WATCHDOG": 1}
            if status:
                fields["STATUS"] = status()
            notifier.notify(**fields)


def background(coro_fn: Callable[[], Awaitable[None]], name: str
               ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx entry that runs `coro_fn` for the app's lifetime and cancels it on shutdown."""

    async def ctx(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_logged(coro_fn, name), name=name)
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    return ctx


async def _logged(coro_fn: Callable[[], Awaitable[None]], name: str) -> None:
    try:
        await coro_fn()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background task %s died", name)
        raise


SiteFactory = Callable[[web.AppRunner], web.BaseSite]


# The young generation's collection threshold once a service is up (settle_heap); Python's default is 700.
YOUNG_GC_THRESHOLD = 10_000
# How long a stopping service waits for a cancelled task before cancelling it again (cancel_all): longer than a
# stop means to take (the gateway finishes the answers in flight, which the units' TimeoutStopSec=30 bounds),
# so only a task that lost its cancellation is cut, and named before systemd's SIGKILL.
RECANCEL_S = 25.0


def settle_heap() -> None:
    """For a service's process (gateway, agent, scheduler) once it listens: collect once, freeze what start-up
    built, and collect the young generation every YOUNG_GC_THRESHOLD net allocations instead of 700.

    Why: start-up leaves some 60,000 objects that live as long as the process (modules, the app, its routes,
    the config), and a full collection walked them all: 30-40 ms each under load (measured), a pause that
    every request in flight waited out. Under load a gateway's requests in flight keep a few hundred objects
    alive each, so with the defaults the collector ran about 100 times a second at 5,000 requests/s and took
    7-11 us of CPU a request, a tenth of the gateway's whole cost (scripts/bench_gateway.py, gc callbacks);
    after settling it ran 0 times in the same window. Frozen objects are never collected again (gc.freeze),
    which costs nothing for what lives as long as the process; cycles made later are still collected.
    Only for a process of its own: a test that serves in-process keeps Python's defaults."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


async def serve_until_cancelled(app: web.Application, host: str, port: int, notifier: Notifier, what: str,
                                status: Callable[[], str] | None = None, site: SiteFactory | None = None,
                                healthy: Callable[[], bool] = lambda: True,
                                listening_hook: Callable[[], None] = lambda: None,
                                before_listening: Callable[[], Awaitable[object]] | None = None) -> None:
    """Serve `app` on host:port until the calling task is cancelled, then shut it down cleanly.

    handler_cancellation is on so that a client that disconnects cancels its handler, which closes the
    upstream request in turn: an abandoned generation stops consuming the engine.
    READY=1 once listening; WATCHDOG=1 is fed from this loop while `healthy()` (the service's mirrors of the
    cluster are live), so a blocked loop or a view of the cluster that cannot be trusted stops feeding it.
    `site` makes the listening site in place of aiohttp's TCPSite on host:port (the gateway's: its
    data-plane server, TLS, a port shared by workers). `listening_hook` runs once it listens, before READY=1
    (a service's own process: settle_heap). `before_listening` is awaited once the app has started (its
    cleanup_ctx tasks run), before the port opens: the gateway waits there for its first view of the cluster.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    try:
        if before_listening is not None:
            await before_listening()
        listening = site(runner) if site is not None else web.TCPSite(runner, host, port, reuse_address=True)
        await listening.start()
        log.info("%s listening on %s", what, listening.name)
        listening_hook()
        await notify_ready_and_watch(notifier, healthy, status or (lambda: f"{what} listening on {host}:{port}"))
        await asyncio.Event().wait()  # no watchdog configured: just serve until cancelled
    finally:
        notifier.notify(STOPPING=1)
        await runner.cleanup()


@dataclass
class ServiceContext:
    """What every service's main gets: the store, its own metrics registry, the notifier, a stop event."""

    cfg: NebulaConfig
    store: Store
    registry: CollectorRegistry
    notifier: Notifier
    stop: asyncio.Event


@asynccontextmanager
async def service_context(cfg: NebulaConfig, env: Mapping[str, str]) -> AsyncIterator[ServiceContext]:
    stop = stop_on_signals()
    notifier = Notifier(env)
    store = await open_store(cfg)
    try:
        registry = CollectorRegistry()
        GCCollector(registry=registry)  # python_gc_*: how often the collector runs (settle_heap), per generation
        yield ServiceContext(cfg=cfg, store=store, registry=registry, notifier=notifier, stop=stop)
    finally:
        await store.close()
        notifier.close()


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so a service can shut down in order."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_tasks_until(stop: asyncio.Event, tasks: list[asyncio.Task[Any]],
                          recancel_s: float = RECANCEL_S) -> None:
    """Wait for `stop` (or any task dying, which is a bug worth a restart by the supervisor), then cancel all."""
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    await cancel_all([stopper, *tasks], recancel_s)
    for t in done:
        if t is not stopper and not t.cancelled() and t.exception() is not None:
            raise RuntimeError(f"task {t.get_name()} died") from t.exception()


async def cancel_all(tasks: list[asyncio.Task[Any]], recancel_s: float = RECANCEL_S) -> None:
    """Cancel `tasks` and wait until every one has ended. One still running `recancel_s` after its cancellation
    is named in the log and cancelled again, until it ends: a cancellation can be lost (Python 3.11's wait_for,
    which Nebula's code no longer calls but a library may, returns the awaited call's result when the call ends
    in the same turn as the cancellation, gh-86296), and a stop must not hang on the task that lost it (a node
    agent that outlived its SIGTERM kept its lease)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
        if pending:
            log.warning("still running %.1f s after being cancelled, cancelling again: %s", recancel_s,
                        ", ".join(sorted(t.get_name() for t in pending)))
    await asyncio.gather(*tasks, return_exceptions=True)  # all ended: this only collects their outcomes


async def open_store(cfg: NebulaConfig) -> Store:
    from nebula.adapters.etcd import EtcdStore

    security = etcd_security(cfg)
    try:
        return await EtcdStore.connect(list(cfg.cluster.etcd_endpoints), timeout=cfg.cluster.etcd_timeout_s,
                                       security=security)
    except PermanentError as e:  # e.g. a wrong etcd_user/etcd_password: no retry can fix it
        raise ConfigError("cluster", f"cluster: etcd refused this client: {e}") from None


def etcd_security(cfg: NebulaConfig) -> EtcdSecurity:
    """[cluster]'s TLS files, read now (a bad path stops the start, naming its key), and credentials."""
    from nebula.adapters.etcd_connection import EtcdSecurity

    def read(key: str, path: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cluster.{key}", f"cluster.{key}: cannot read {path}: {e.strerror}") from None

    c = cfg.cluster
    return EtcdSecurity(ca=read("etcd_ca_file", c.etcd_ca_file), cert=read("etcd_cert_file", c.etcd_cert_file),
                        key=read("etcd_key_file", c.etcd_key_file), user=c.etcd_user, password=c.etcd_password)
