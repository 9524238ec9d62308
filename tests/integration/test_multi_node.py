"""Two node agents on one machine, each its own node: replicas spread over both; when one node dies its replica
moves to the other after the grace period, and chat through the gateway keeps working throughout."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.harness.cluster import NebulaCluster, required_path, running_cluster, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.etcd]
GRACE_S = 8.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NebulaCluster]:
    with running_cluster(tmp_path_factory.mktemp("fleet"), tmp_path_factory.mktemp("fleet-etcd"),
                         node_grace_s=GRACE_S, extra_nodes=("node-b",)) as c:
        yield c


def placement(c: NebulaCluster, model: str) -> dict[str, tuple[str, str]]:
    """instance -> (node, phase) from the admin API."""
    for m in c.models():
        if m["name"] == model:
            return {i["instance"]: (i["node"], i["phase"]) for i in m["instances"]}
    return {}


@dataclass
class SteadyLoad:
    """Chat requests in a loop from a thread, counting failures, until stopped (bounded by `limit_s`)."""

    client: openai.OpenAI
    limit_s: float = 600.0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                r = self.client.chat.completions.create(
                    model="duo", messages=[{"role": "user", "content": f"hi {self.ok}"}], max_tokens=2)
                assert r.choices[0].message.content is not None
                self.ok += 1
            except Exception as e:  # every failure counts, whatever its type
                self.failures.append(repr(e))
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(60)


def test_replicas_spread_and_move_when_a_node_dies(fleet: NebulaCluster) -> None:
    c = fleet
    models = Path(required_path("NEBULA_TEST_MODELS"))
    c.cli("load", "duo", "--source", str(models / "tiny-llama"), "--replicas", "2")

    def both_ready() -> bool:
        p = placement(c, "duo")
        return len(p) == 2 and all(phase == "ready" for _, phase in p.values())

    wait_until(both_ready, 480, "two replicas ready", c, interval_s=1.0)
    nodes = {node for node, _ in placement(c, "duo").values()}
    assert nodes == {"node-a", "node-b"}, f"replicas not spread: {placement(c, 'duo')}"

    client = openai.OpenAI(base_url=c.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    load = SteadyLoad(client)
    load.start()
    try:
        time.sleep(2)
        # node-b dies: its agent and its engines, all at once.
        b_engines = c.engine_pids("node-b")
        c.kill("node:node-b", signal.SIGKILL)
        for pid in b_engines.values():
            _killpg(pid)
        died = time.monotonic()

        def moved() -> bool:
            p = placement(c, "duo")
            return len(p) == 2 and all(node == "node-a" and phase == "ready" for node, phase in p.values())

        wait_until(moved, 480, "the dead node's replica ready on node-a", c, interval_s=1.0)
        moved_after = time.monotonic() - died
    finally:
        load.stop()
    print(f"\nmulti-node: replica moved and ready {moved_after:.0f} s after the node died "
          f"(grace {GRACE_S:.0f} s, lease 5 s); {load.ok} chats, {len(load.failures)} failed")
    assert moved_after > GRACE_S, "replicas moved before the grace period ended"
    assert load.ok > 10
    assert load.failures == [], f"chat failed while a node died: {load.failures[:3]}"


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
