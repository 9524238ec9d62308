"""Replace a model with no downtime, on real vLLM CPU engines and two node agents on one machine: a rolling update
under steady load (streamed and plain chats through the gateway with the openai SDK) fails nothing and cuts no
stream; an update whose engines cannot start rolls back, failing nothing, and says why; a node drain moves a
replica with surge, failing nothing. Bad input: an invalid spec, an update during an update, a drain of the last
node that can hold the model."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness.cluster import NebulaCluster, required_path, running_cluster, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.etcd]
MODEL = "roll"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NebulaCluster]:
    with running_cluster(tmp_path_factory.mktemp("roll"), tmp_path_factory.mktemp("roll-etcd"),
                         extra_nodes=("node-b",), extra_env={"NEBULA_SCHEDULER_ROLLOUT_SETTLE_S": "3"}) as c:
        models = Path(required_path("NEBULA_TEST_MODELS"))
        c.cli("load", MODEL, "--source", str(models / "tiny-llama"), "--replicas", "2")
        wait_until(lambda: ready(c) == 2, 600, "two replicas ready", c, interval_s=1.0)
        yield c


def instances(c: NebulaCluster) -> list[dict[str, Any]]:
    for m in c.models():
        if m["name"] == MODEL:
            return list(m["instances"])
    return []


def ready(c: NebulaCluster, node: str | None = None) -> int:
    return sum(1 for i in instances(c) if i["phase"] == "ready" and (node is None or i["node"] == node))


@dataclass
class SteadyLoad:
    """Chats in a loop from two threads (one streams, one does not), counting what failed or was cut."""

    client: openai.OpenAI
    ok: int = 0
    streams: int = 0
    failures: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SteadyLoad:
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in (False, True)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self, stream: bool) -> None:
        deadline = time.monotonic() + 1200
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            n += 1
            messages: Any = [{"role": "user", "content": f"count to ten, take {n}"}]
            try:
                if stream:
                    finish = None
                    for chunk in self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48,
                                                                      stream=True):
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                    if finish is None:
                        self.cut.append(f"stream {n} ended without a finish_reason")
                    else:
                        self.streams += 1
                else:
                    r = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
                    assert r.choices[0].message.content is not None
                    self.ok += 1
            except Exception as e:  # every failure counts, whatever its type
                self.failures.append(repr(e)[:300])
            # Requests keep flowing through every switch, but the load leaves CPU to the replica being started
            # (with a 0.1 s pause the two busy engines took the 2 cores: ~300 s per replaced replica here).
            time.sleep(0.5)


def nebula(c: NebulaCluster, *args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nebula", *args], env=c.env(), capture_output=True, text=True,
                          timeout=timeout_s)


def client(c: NebulaCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_rolling_update_under_load_fails_nothing_and_cuts_no_stream(fleet: NebulaCluster) -> None:
    c = fleet
    bad = nebula(c, "update", MODEL, "--engine-arg=--api-key=secret")
    assert bad.returncode != 0 and "--api-key" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    with SteadyLoad(client(c)) as load:
        time.sleep(3)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "nebula", "update", MODEL, "--engine-arg=--max-num-seqs=8"],
                                env=c.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: len(instances(c)) == 3, 60, "the surge replica placed", c, interval_s=0.5)
        second = nebula(c, "update", MODEL, "--revision", "main", timeout_s=60)
        assert second.returncode != 0 and "is already being updated" in second.stderr, second.stderr
        out, err = proc.communicate(timeout=900)
        took = time.monotonic() - started
        time.sleep(3)
    assert proc.returncode == 0, out + err
    assert f"model {MODEL} updated: 2/2 replicas replaced" in out, out
    spec = next(m for m in c.models() if m["name"] == MODEL)["spec"]
    print(f"\nrolling update: 2 replicas replaced in {took:.0f} s ({took / 2:.0f} s per replica); "
          f"{load.ok} chats and {load.streams} streams served, {len(load.failures)} failed, {len(load.cut)} cut; "
          f"progress:\n{out}")
    assert load.ok > 10 and load.streams > 5
    assert load.failures == [], load.failures[:3]
    assert load.cut == [], load.cut[:3]
    assert spec["engine_args"] == ["--max-num-seqs=8"], spec
    # The update is done once traffic has moved; the last old replica may still be draining and stopping.
    wait_until(lambda: ready(c) == 2 and len(instances(c)) == 2, 120, "the last old replica stopped", c)


def test_an_update_whose_engines_cannot_start_rolls_back_and_says_why(fleet: NebulaCluster) -> None:
    c = fleet
    before = next(m for m in c.models() if m["name"] == MODEL)["spec"]["engine_args"]
    with SteadyLoad(client(c)) as load:
        time.sleep(2)
        started = time.monotonic()
        res = nebula(c, "update", MODEL, "--engine-arg=--dtype=float13")
        took = time.monotonic() - started
    print(f"\nfailed update rolled back in {took:.0f} s: {res.stderr.strip()}; {load.ok} chats and {load.streams} "
          f"streams served, {len(load.failures)} failed, {len(load.cut)} cut")
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"model {MODEL} rolled back: new replica" in res.stderr and "failed" in res.stderr, res.stderr
    assert "argument --dtype: invalid choice: 'float13'" in res.stderr, "the reason is vLLM's own words"
    spec = next(m for m in c.models() if m["name"] == MODEL)["spec"]
    assert spec["engine_args"] == before, "the model's spec is the previous one again"
    assert load.failures == [] and load.cut == [], (load.failures[:3], load.cut[:3])
    wait_until(lambda: ready(c) == 2 and len(instances(c)) == 2, 120, "back to two ready replicas", c)


def test_a_node_drain_moves_its_replica_with_surge_and_fails_nothing(fleet: NebulaCluster) -> None:
    c = fleet
    on_b = [i["instance"] for i in instances(c) if i["node"] == "node-b"]
    assert on_b, f"nothing on node-b to drain: {instances(c)}"
    with SteadyLoad(client(c)) as load:
        time.sleep(2)
        started = time.monotonic()
        assert nebula(c, "node", "drain", "node-b").returncode == 0
        last = nebula(c, "node", "drain", "node-a")
        assert last.returncode != 0 and "no other undrained live node can hold it" in last.stderr, last.stderr
        wait_until(lambda: ready(c, "node-a") == 2 and len(instances(c)) == 2, 600,
                   "both replicas ready on node-a, node-b's drained", c, interval_s=1.0)
        took = time.monotonic() - started
        time.sleep(2)
    print(f"\nnode drain: 1 replica moved in {took:.0f} s; {load.ok} chats and {load.streams} streams served, "
          f"{len(load.failures)} failed, {len(load.cut)} cut")
    assert load.failures == [] and load.cut == [], (load.failures[:3], load.cut[:3])
    assert nebula(c, "node", "undrain", "node-b").returncode == 0
