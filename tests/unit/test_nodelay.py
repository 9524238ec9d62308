"""TCP_NODELAY on every socket of the data path, under both event loops the gateway runs on (gateway.event_loop):
the client's connection the gateway accepted and its connections to the engine. Without it, Nagle's algorithm
holds a small write (an SSE chunk) until the peer's delayed ACK: up to 40 ms per streamed response on a quiet
keep-alive connection. Nebula sets nothing itself: asyncio and uvloop set the flag on TCP transports they make,
and this test reads it off the real sockets (from /proc/self/fd) so that a change of loop or transport that
loses it fails here."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable

import aiohttp
import pytest
import uvloop
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, dumps
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, put_instance, until

Endpoints = tuple[tuple[str, int], tuple[str, int]]


def tcp_connections() -> dict[Endpoints, bool]:
    """This process's connected TCP sockets: (local, peer) -> whether TCP_NODELAY is set."""
    found: dict[Endpoints, bool] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:  # not a socket (or closed meanwhile)
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                continue
            try:
                peer = sock.getpeername()[:2]
            except OSError:  # a listening socket
                continue
            found[(sock.getsockname()[:2], peer)] = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return found


async def relay_and_inspect(stream: bool, chunked_body: bool) -> tuple[dict[Endpoints, bool], int, int]:
    """One request through an in-process gateway to a fake engine, connections kept open; the sockets then."""
    engine = FakeEngine("a")
    await engine.start()
    store = MemoryStore()
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="org/m").to_dict()))
    await put_instance(store, "m", engine.endpoint)
    server = GatewayServer(build_gateway_app(GatewayConfig(load_poll_s=0), store, CollectorRegistry()))
    await server.start_server()
    try:
        await until(lambda: server.app[GATEWAY].table.has_candidate("m"))
        body = json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()

        async def chunks() -> object:  # a chunked request body: the data-plane server hands it to aiohttp
            yield body

        async with aiohttp.ClientSession() as http:
            data = chunks() if chunked_body else body
            async with http.post(str(server.make_url("/v1/chat/completions")), data=data,
                                 headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            return tcp_connections(), server.port, int(engine.endpoint.rsplit(":", 1)[1])
    finally:
        await server.close()
        await engine.stop()


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop,
                                                              "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(("stream", "chunked_body"), [(True, False), (False, False), (True, True)],
                         ids=["stream", "plain", "aiohttp-stack"])
def test_every_data_path_socket_has_tcp_nodelay(loop: str, stream: bool, chunked_body: bool) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        conns, gateway_port, engine_port = runner.run(relay_and_inspect(stream, chunked_body))
    accepted = {k: v for k, v in conns.items() if k[0][1] == gateway_port}
    upstream = {k: v for k, v in conns.items() if k[1][1] == engine_port}
    assert accepted and upstream, conns  # kept alive: both ends of the relay are open when read
    assert all(accepted.values()), f"client connections without TCP_NODELAY: {accepted}"
    assert all(upstream.values()), f"engine connections without TCP_NODELAY: {upstream}"


def test_the_reader_sees_a_socket_without_the_flag() -> None:
    """The check above can fail: a plain connected socket (no TCP_NODELAY) reads False, one with it True."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()[:2]) as plain:
        accepted, _ = listener.accept()
        with accepted:
            accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns = tcp_connections()
            assert conns[(plain.getsockname()[:2], plain.getpeername()[:2])] is False
            assert conns[(accepted.getsockname()[:2], accepted.getpeername()[:2])] is True
