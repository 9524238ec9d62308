"""Scale to zero on a real vLLM CPU engine: an elastic model idle for idle_unload_s really stops its unit (the
CPU path: vLLM's sleep mode is CUDA-only, so an idle action of sleep stops here too), `nebula list` shows it
idle, and a wake request starts it again: the figure is the CPU wake time (a cold start).

Load reports are written as a gateway worker writes them (tests/integration/test_elastic_scheduler.py); the
gateway's own reports, held requests and /v1/models listing are the gateway side's tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nebula.core import keys
from nebula.core.elastic import ModelLoad, WakeRequest
from tests.chaos import probes
from tests.harness.cluster import required_path, running_cluster, wait_until
from tests.harness.etcd import etcd_get
from tests.integration.test_elastic_scheduler import gateway_worker, put, scale

pytestmark = [pytest.mark.engine, pytest.mark.etcd]
READY_TIMEOUT_S = 420
IDLE_S = 5


def test_an_idle_model_stops_its_engine_and_a_wake_starts_it(tmp_path: Path) -> None:
    model = Path(required_path("NEBULA_TEST_MODELS")) / "tiny-llama"
    (tmp_path / "c").mkdir()
    (tmp_path / "etcd").mkdir()
    env = {"NEBULA_SCHEDULER_SCALING_PASS_S": "0.5"}
    with running_cluster(tmp_path / "c", tmp_path / "etcd", extra_env=env) as c, gateway_worker(c) as gw:
        # A client waits while it starts (idleness counts from the load, and a CPU start outlasts IDLE_S).
        gw.load = ModelLoad(inflight=1, last_request=time.time())
        # sleep asked for, on a CPU fleet: it stops instead, and says so.
        c.cli("load", "el", "--source", str(model), "--max-model-len", "512", "--idle-unload", f"{IDLE_S}s",
              "--idle-action", "sleep", "--wait", str(READY_TIMEOUT_S))
        pids = c.engine_pids()
        assert set(pids) == {"el"}
        spec = json.loads((c.run_dir / "engines" / "el.json").read_text())
        assert "sleep_mode" not in spec  # no sleep mode on CPU: the engine starts as any other

        t0 = time.monotonic()
        gw.load = ModelLoad(last_request=time.time())
        wait_until(lambda: not c.engine_pids() and not probes.placed(c), IDLE_S + 60, "the idle engine stopped", c)
        stop_s = time.monotonic() - t0
        wait_until(lambda: not any(x["instances"] for x in c.models()), 30, "its instance record gone", c)
        st = scale(c, "el")
        assert st is not None and st.replicas == 0 and "CUDA-only" in st.reason
        listed = json.loads(c.cli("list", "--json").stdout)
        (m,) = [m for m in listed if m["name"] == "el"]
        assert m["scale"]["state"] == "idle" and m["instances"] == [] and m["pending_reason"] is None
        row = [line for line in c.cli("list").stdout.splitlines() if line.startswith("el ")]
        assert row and " idle " in row[0]

        t0 = time.monotonic()
        put(c, keys.wake_key("el"), WakeRequest(model="el", at=time.time(), by="test-gw.1").to_dict())
        gw.load = ModelLoad(held=1, last_request=time.time())

        def ready() -> bool:
            return any(x["name"] == "el" and x["ready"] >= 1 for x in c.models())

        wait_until(ready, READY_TIMEOUT_S, "el woken and ready", c, interval_s=0.5)
        wake_s = time.monotonic() - t0
        assert etcd_get(c.etcd.endpoints, keys.wake_key("el")) is None
        print(f"\nCPU scale to zero: engine stopped {stop_s:.1f}s after the last request (idle_unload_s {IDLE_S}); "
              f"wake (stop/start path) to ready in {wake_s:.1f}s")
        c.cli("unload", "el")
        wait_until(lambda: not c.engine_pids(), 60, "el unloaded", c)
