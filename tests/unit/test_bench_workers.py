"""scripts/bench_workers.py's pure parts and its reading of the kernel: which worker counts it measures, wrk's
summary line, and how many sockets listen on a port (tests.harness.ports.listening: it waits for every worker's
before measuring, since the kernel spreads connections only over the listeners there are when they connect)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_workers import default_counts, default_load, parse_args, parse_wrk, wrk_script  # noqa: E402

from tests.harness.ports import listening  # noqa: E402


def test_default_counts_are_those_with_a_core_each() -> None:
    assert default_counts(1) == [1]
    assert default_counts(2) == [1, 2]
    assert default_counts(6) == [1, 2, 4]
    assert default_counts(16) == [1, 2, 4, 8]


def test_default_load_keeps_the_client_and_engine_ahead_of_the_workers() -> None:
    # (wrk threads, connections, engine processes): on 2 CPUs what the 2-core figures were measured with.
    assert default_load(2, [1, 2]) == (1, 64, 1)
    # 16 CPUs: 8 workers, 4 client threads and 2 engines fit (14), with 32 requests in flight per worker.
    assert default_load(16, [1, 2, 4, 8]) == (4, 256, 2)
    assert default_load(64, [16]) == (16, 512, 10)


def test_wrk_summary_is_read_from_its_line() -> None:
    out = ("Running 1s test @ http://127.0.0.1:1/v1/chat/completions\n  1 threads and 16 connections\n"
           'WRK {"requests":1200,"duration_us":1000500,"non2xx":3,"socket_errors":1,"p50_us":410,"p99_us":2210}\n')
    assert parse_wrk(out) == {"requests": 1200, "duration_us": 1000500, "non2xx": 3, "socket_errors": 1,
                              "p50_us": 410, "p99_us": 2210}
    with pytest.raises(ValueError, match="no summary") as raised:
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
    assert "unable to connect" in str(raised.value)  # wrk's own words, for the reader


def test_wrk_script_sends_the_key_only_to_the_gateway() -> None:
    assert 'wrk.headers["Authorization"] = "Bearer k1"' in wrk_script("k1")
    assert "Authorization" not in wrk_script("")
    assert 'wrk.method = "POST"' in wrk_script("")


@pytest.fixture
def reuseport_listeners() -> Iterator[tuple[int, list[socket.socket]]]:
    with ExitStack() as stack:
        socks: list[socket.socket] = []
        port = 0
        for _ in range(3):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            port = sock.getsockname()[1]
            socks.append(sock)
        yield port, socks


def test_listening_counts_each_reuseport_socket_once_it_listens(
        reuseport_listeners: tuple[int, list[socket.socket]]) -> None:
    port, socks = reuseport_listeners
    assert listening(port) == []  # bound, not listening: a worker still starting
    socks[0].listen()
    socks[1].listen()
    assert listening(port) == ["127.0.0.1"] * 2
    socks[2].listen()
    assert len(listening(port)) == 3
    socks[0].close()
    assert len(listening(port)) == 2


def test_listening_ignores_connected_sockets_and_missing_tables(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client, server.accept()[0]:
            assert client.getpeername()[1] == port
            assert listening(port) == ["127.0.0.1"]  # the accepted socket has the same local port: not counted
    assert listening(port, (str(tmp_path / "absent"),)) == []


def test_parse_args_defaults() -> None:
    args = parse_args([])
    # 0: sized by default_load from the CPUs and the counts, once those are known.
    assert args.role is None and args.workers == ""
    assert args.connections == args.threads == args.engine_procs == 0
    assert parse_args(["canned-engine", "--port", "5"]).role == "canned-engine"
