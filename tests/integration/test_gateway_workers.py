"""`gateway.workers = 2` as systemd would run it: `nebula gateway run` under a NOTIFY_SOCKET and watchdog that
this test owns, against a real etcd, forwarding to a fake engine. Both workers serve the one port, each
registers its own /metrics, a killed worker is replaced while the other serves, a key's rate limit holds
across the workers, and SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from nebula.core import apikeys, keys
from nebula.core.apikeys import KeyLimits, KeyRecord, KeyScope
from nebula.core.model import ModelSpec, dumps
from nebula.services.gateway.workers import parse_notification
from tests.harness.etcd import EtcdServer, etcd_call, etcd_list
from tests.harness.ports import free_port
from tests.unit.fake_engine import FakeEngine

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


def etcd_put(endpoint: str, key: str, value: bytes) -> None:
    etcd_call(endpoint, "/v3/kv/put", {"key": base64.b64encode(key.encode()).decode(),
                                       "value": base64.b64encode(value).decode()})


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class SystemdStandIn:
    """The service manager's side of sd_notify: a socket that collects the supervisor's notifications."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(f"\0nebula-test-notify-{os.getpid()}-{id(self)}")
        self.sock.setblocking(False)
        self.address = "@" + self.sock.getsockname()[1:].decode()
        self.seen: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                self.seen.append(parse_notification(self.sock.recv(4096)))
            except BlockingIOError:
                return self.seen


async def until(cond: object, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if cond() if callable(cond) else cond:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def worker_metrics(etcd: EtcdServer) -> list[str]:
    return sorted(kv["key"].rsplit("/", 1)[1] for kv in etcd_list(etcd.endpoints, keys.SERVICES + "gateway/"))


async def served_requests(http: aiohttp.ClientSession, address: str) -> float:
    async with http.get(f"http://{address}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nebula_gateway_requests_total{"))


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine("e1")
    await fake.start()
    yield fake
    await fake.stop()


async def test_two_workers_share_the_port_and_are_kept(tmp_path: Path, engine: FakeEngine) -> None:
    etcd = EtcdServer.launch(tmp_path / "etcd")
    systemd = SystemdStandIn()
    port = free_port()
    config = tmp_path / "nebula.toml"
    config.write_text(f'[cluster]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl_s = 5\n\n'
                      f'[gateway]\nport = {port}\nworkers = 2\nadmin_key_digest_file = ""\n')
    etcd_put(etcd.endpoint, keys.model_key("m"), dumps(ModelSpec(name="m", source="/models/m").to_dict()))
    etcd_put(etcd.endpoint, keys.instance_key("m:1"), dumps({
        "instance": "m:1", "model": "m", "node": "n1", "phase": "ready", "endpoint": engine.endpoint}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEBULA_")}
    env.update(NEBULA_CONFIG=str(config), NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="4000000",
               PYTHONPATH=str(ROOT))
    log = (tmp_path / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "nebula", "gateway", "run", env=env,
                                                stdout=log, stderr=log, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        await until(lambda: any(n.get("READY") == "1" for n in systemd.drain()), 60, "READY=1 from the supervisor")
        ready = next(n for n in systemd.seen if n.get("READY") == "1")
        assert ready.get("STATUS") == "2/2 workers ready"
        workers = children(proc.pid)
        assert len(workers) == 2
        await until(lambda: len(worker_metrics(etcd)) == 2, 30, "both workers' /metrics registered")

        # A connection per request, so the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(40):
                async with http.post(url, data=CHAT, headers={"Content-Type": "application/json"}) as resp:
                    assert resp.status == 200, await resp.text()
            served = [await served_requests(http, a) for a in worker_metrics(etcd)]
            assert sum(served) == 40 and all(served), served

            # The supervisor keeps feeding systemd's watchdog from its own loop.
            pings = sum(1 for n in systemd.drain() if n.get("WATCHDOG") == "1")
            await until(lambda: sum(1 for n in systemd.drain() if n.get("WATCHDOG") == "1") > pings, 10,
                        "WATCHDOG=1 to systemd")

            before = set(worker_metrics(etcd))
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            await until(lambda: victim not in children(proc.pid), 10, "the killed worker reaped")
            for _ in range(20):  # the survivor serves alone meanwhile
                async with http.post(url, data=CHAT, headers={"Content-Type": "application/json"}) as resp:
                    assert resp.status == 200
            await until(lambda: len(children(proc.pid)) == 2, 30, "a new worker in the killed one's place")
            # The dead worker's record leaves with its lease; the new one registers another port.
            await until(lambda: len(worker_metrics(etcd)) == 2 and len(set(worker_metrics(etcd)) - before) == 1, 30,
                        "the new worker registered in place of the dead one")
            assert proc.returncode is None

            # A key's limits hold for the gateway, not per worker: 20 a minute across both (the new one too).
            token = "sk-shared-limits-test"
            record = KeyRecord(id="00000000000000aa", name="limited", digest=apikeys.digest(token),
                               scopes=frozenset({KeyScope.INFERENCE}), limits=KeyLimits(requests_per_minute=20))
            etcd_put(etcd.endpoint, keys.apikey_key(record.id), dumps(record.to_dict()))
            authorized = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            statuses: list[int] = []
            started = time.monotonic()
            while len(statuses) < 5 or 401 in statuses[-5:]:  # until both workers have seen the key
                assert time.monotonic() - started < 30, f"the key never reached both workers: {statuses}"
                async with http.post(url, data=CHAT, headers=authorized) as resp:
                    statuses.append(resp.status)
            for _ in range(40):
                async with http.post(url, data=CHAT, headers=authorized) as resp:
                    statuses.append(resp.status)
            refilled = (time.monotonic() - started) / 3  # one more every 3 s
            ok = statuses.count(200)
            assert 20 <= ok <= 20 + refilled + 1, (ok, statuses)
            assert set(statuses) <= {200, 401, 429} and statuses[-1] == 429

        survivors = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 40) == 0
        assert not [p for p in survivors if alive(p)]
        assert any(n.get("STOPPING") == "1" for n in systemd.drain())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        etcd.stop()
        print((tmp_path / "gateway.log").read_text()[-4000:])
