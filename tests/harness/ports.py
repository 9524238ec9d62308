"""Loopback ports for the test session's servers, handed out once each.

Ports come from below the kernel's ephemeral range (32768-60999 on Linux), so a client socket or a server
that binds port 0 cannot take one between the moment it is handed out and the moment its server binds it;
and no port is handed out twice in one session, so two servers of one cluster never get the same port (the
kernel's `bind(0)` may return the port it returned a moment ago once that socket is closed: a gateway and a
scheduler once both got 37891). A port is handed out only while nothing listens on it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

_LOW, _HIGH = 20000, 32000


class PortPool:
    """Hands out free loopback ports (and runs of them) in [low, high), never the same one twice."""

    def __init__(self, low: int = _LOW, high: int = _HIGH) -> None:
        self._low, self._high = low, high
        self._given: set[int] = set()
        self._lock = threading.Lock()
        self._rng = random.Random()

    def take(self, size: int = 1) -> int:
        """The first of `size` consecutive free ports, none handed out before."""
        with self._lock:
            for _ in range(500):
                base = self._rng.randrange(self._low, self._high - size)
                run = range(base, base + size)
                if not any(p in self._given for p in run) and all(port_is_free(p) for p in run):
                    self._given.update(run)
                    return base
        raise RuntimeError(f"no {size} free consecutive ports left in {self._low}-{self._high}")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like etcd itself, ignore TIME_WAIT leftovers of our own previous run; a listener still fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


SESSION_PORTS = PortPool()
"""The one pool of the test session (a pytest run is one process)."""


def free_port() -> int:
    return SESSION_PORTS.take()


def free_port_range(size: int) -> int:
    return SESSION_PORTS.take(size)


def listening(port: int, tables: Sequence[str] = ("/proc/net/tcp", "/proc/net/tcp6")) -> list[str]:
    """The local address of each socket in LISTEN state on `port`, from the kernel's own table: one entry per
    socket, so that N processes listening on one port with SO_REUSEPORT give N."""
    out = []
    for table in tables:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A: TCP_LISTEN
                    raw = bytes.fromhex(addr)
                    # The kernel prints each 32-bit word in host (little-endian) order.
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    out.append(str(ipaddress.ip_address(words)))
    return out
