"""Elastic capacity end to end on real vLLM CPU engines, with nothing written by the test but client requests:
the gateway publishes its own load reports, holds requests and asks for the wake; the scheduler decides; the
agent starts and stops the units.

One model goes through its whole life: a load step through the gateway makes it 1 -> 2 replicas and back (with
exactly one decision each way: no flapping), it unloads once idle (the CPU path: an idle action of sleep stops
here, vLLM's sleep mode being CUDA-only), it is listed as idle, and 200 concurrent first requests cause exactly
one wake and are all answered. The figures printed: scale-up and wake times, held requests.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from nebula.core import keys
from tests.chaos import probes
from tests.harness.cluster import NebulaCluster, required_path, running_cluster, wait_until
from tests.harness.etcd import etcd_get
from tests.integration.test_elastic_scheduler import FAST, decisions, scale

pytestmark = [pytest.mark.engine, pytest.mark.etcd]
READY_TIMEOUT_S = 420
IDLE_S = 12
CONCURRENT_FIRST = 200
LOAD_THREADS = 8  # 8 requests always in flight: 8 per replica at 1, above the target 2


def _metric_sum(url: str, name: str, model: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$'
    return sum(float(m[1]) for m in re.finditer(pattern, text, re.M))


def _ready(c: NebulaCluster, model: str) -> int:
    """Ready replicas, over plain HTTP: no CLI process per poll beside a load generator on a 2-core machine."""
    with urllib.request.urlopen(c.gateway_url + "/v1/admin/models", timeout=10) as resp:
        models = json.loads(resp.read())["data"]
    return next((int(m["ready"]) for m in models if m["name"] == model), 0)


class LoadStep:
    """LOAD_THREADS clients, each with one streamed chat request always in flight, until stopped."""

    def __init__(self, base_url: str) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
        self.stop = threading.Event()
        self.done = 0
        self.failed: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(LOAD_THREADS)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                stream = self.client.chat.completions.create(
                    model="el", messages=[{"role": "user", "content": "count"}], max_tokens=48, stream=True)
                for _ in stream:
                    pass
                self.done += 1
            except openai.APIError as e:
                self.failed.append(repr(e))

    def __enter__(self) -> LoadStep:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(150)


async def _first_requests(base_url: str) -> tuple[list[str], float, float]:
    """CONCURRENT_FIRST requests at once: (answers, seconds to the first answer, seconds to the last)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    t0 = time.monotonic()
    first: list[float] = []

    async def one(i: int) -> str:
        r = await client.chat.completions.create(model="el", messages=[{"role": "user", "content": f"hi {i}"}],
                                                 max_tokens=4)
        first.append(time.monotonic() - t0)
        return r.choices[0].message.content or ""

    answers = await asyncio.gather(*(one(i) for i in range(CONCURRENT_FIRST)))
    await client.close()
    return list(answers), min(first), time.monotonic() - t0


def test_an_elastic_model_scales_with_load_unloads_when_idle_and_wakes_once(tmp_path: Path) -> None:
    model = Path(required_path("NEBULA_TEST_MODELS")) / "tiny-llama"
    (tmp_path / "c").mkdir()
    (tmp_path / "etcd").mkdir()
    # A down window of some seconds: a starved 2-core machine can pause the test's own load generator for a
    # few, and that is a real lull the scheduler would rightly act on.
    env = FAST | {"NEBULA_GATEWAY_LOAD_REPORT_S": "0.5", "NEBULA_SCHEDULER_SCALE_DOWN_WINDOW_S": "8"}
    with running_cluster(tmp_path / "c", tmp_path / "etcd", extra_env=env) as c:
        base_url = c.gateway_url + "/v1"
        # sleep asked for, on a CPU fleet: it stops instead, and says so.
        c.cli("load", "el", "--source", str(model), "--max-model-len", "512", "--max-replicas", "2",
              "--idle-unload", f"{IDLE_S}s", "--idle-action", "sleep", "--wait", str(READY_TIMEOUT_S))
        spec = json.loads((c.run_dir / "engines" / "el.json").read_text())
        assert "sleep_mode" not in spec  # no sleep mode on CPU: the engine starts as any other

        # A load step through the gateway: 1 -> 2 replicas, both serving, then back to 1 once it stops.
        t0 = time.monotonic()
        with LoadStep(base_url) as step:
            wait_until(lambda: _ready(c, "el") == 2, READY_TIMEOUT_S, "a second replica for the load", c,
                       interval_s=0.5)
            up_s = time.monotonic() - t0
            time.sleep(3)  # traffic on both
        ended = time.monotonic()
        assert not step.failed, step.failed[:3]
        wait_until(lambda: len([i for i in probes.placed(c) if i.startswith("el")]) == 1, 60,
                   "back to one replica", c)
        counted = decisions(c, "scheduler")
        assert counted.get("up") == 1 and counted.get("down") == 1, counted  # no flapping

        # Idle for IDLE_S: the engine stops (the stop path), the model is listed as idle.
        wait_until(lambda: not c.engine_pids(), IDLE_S + 60, "the idle engine stopped", c)
        stop_s = time.monotonic() - ended
        wait_until(lambda: not any(m["instances"] for m in c.models() if m["name"] == "el"), 30,
                   "its instance record gone", c)
        st = scale(c, "el")
        assert st is not None and st.replicas == 0 and "CUDA-only" in st.reason
        listed = openai.OpenAI(base_url=base_url, api_key="none").models.list()
        (el,) = [m for m in listed.data if m.id == "el"]
        assert (el.model_extra or {}).get("state") == "idle"
        row = [line for line in c.cli("list").stdout.splitlines() if line.startswith("el ")]
        assert row and " idle " in row[0]

        # 200 concurrent first requests: one wake, all held, all answered.
        answers, first_s, last_s = asyncio.run(_first_requests(base_url))
        assert len(answers) == CONCURRENT_FIRST
        assert decisions(c, "scheduler").get("wake") == 1
        assert _metric_sum(c.gateway_url, "nebula_gateway_wakes_requested_total", "el") == 1
        assert _metric_sum(c.gateway_url, "nebula_gateway_wake_hold_seconds_count", "el") >= CONCURRENT_FIRST
        assert etcd_get(c.etcd.endpoints, keys.wake_key("el")) is None  # the scheduler deleted it
        print(f"\nelastic on CPU: 1 -> 2 replicas ready {up_s:.1f} s after the load step ({step.done} streams, "
              f"0 failed); idle engine stopped {stop_s:.1f} s after the load ended (idle_unload_s {IDLE_S}); "
              f"{CONCURRENT_FIRST} held first requests woke it once: first answer {first_s:.1f} s, last "
              f"{last_s:.1f} s (a cold start)")
        c.cli("unload", "el")
        wait_until(lambda: not c.engine_pids(), 60, "el unloaded", c)
