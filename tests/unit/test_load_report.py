"""The gateway's side of elastic capacity, its pure parts: the load counters kept on the request path (with a
controllable clock), the report built from them and the engines' polled figures, its publication under a lease
of its own, the state word of an elastic model, and the held stream's SSE (keep-alive comments, error events in
each client's shape)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable

import pytest

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import parse_config_text
from nebula.core.elastic import REPORTER_RE, LoadReport, ModelLoad, WakeRequest
from nebula.core.elastic_state import ModelState, model_state
from nebula.core.engine_load import EngineLoad
from nebula.core.model import Phase, Task
from nebula.core.routing import Replica
from nebula.errors import ConfigError
from nebula.services.cluster.writes import ClusterWrites
from nebula.services.gateway.load import LoadBook
from nebula.services.gateway.load_report import LoadAccounting, model_loads, publish_loads, reporter_name
from nebula.services.gateway.wake import keepalive_wanted
from nebula.services.gateway.wake_stream import HeldStream, comment
from nebula.services.http.errors import ApiError
from tests.unit.fake_engine import until


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the counters on the request path -----------------------------------------------------------------------

def test_in_flight_counts_and_stamps_arrival_and_end() -> None:
    wall = FakeClock()
    acct = LoadAccounting(wall)
    acct.begin("m")
    assert acct.inflight == {"m": 1} and acct.last_request["m"] == 1000.0
    wall.now = 1030.0  # a long stream: the model stays recently used until it ends
    acct.begin("m")
    assert acct.inflight["m"] == 2
    acct.end("m")
    assert acct.inflight["m"] == 1 and acct.last_request["m"] == 1030.0
    wall.now = 1100.0
    acct.end("m")
    assert acct.inflight["m"] == 0 and acct.last_request["m"] == 1100.0


def test_a_cancelled_hold_leaves_the_counts_straight() -> None:
    acct = LoadAccounting(FakeClock())
    with pytest.raises(asyncio.CancelledError), acct.holding("m"):
        raise asyncio.CancelledError
    assert acct.held["m"] == 0 and acct.held_total() == 0


def test_holding_counts_held_not_in_flight() -> None:
    wall = FakeClock(5.0)
    acct = LoadAccounting(wall)
    with acct.holding("z"), acct.holding("z"), acct.holding("y"):
        assert acct.held == {"z": 2, "y": 1} and acct.held_total() == 3
        assert acct.inflight == {} and acct.last_request == {"z": 5.0, "y": 5.0}


# --- the report ------------------------------------------------------------------------------------------

def _replica(model: str, port: int) -> Replica:
    return Replica(instance=f"{model}:{port}", endpoint=f"http://127.0.0.1:{port}", model=model, task=Task.GENERATE)


def test_the_report_sums_the_engines_queues_and_takes_the_fullest_cache() -> None:
    book = LoadBook(max_age_s=3.0)
    a, b, c = _replica("m", 1), _replica("m", 2), _replica("other", 3)
    book.record(a.endpoint, EngineLoad(waiting=2, running=5, kv_cache_usage=0.25), 1.0)
    book.record(b.endpoint, EngineLoad(waiting=1, running=3, kv_cache_usage=0.75), 1.0)  # c: no sample yet
    acct = LoadAccounting(FakeClock(42.0))
    acct.begin("m")
    with acct.holding("z"):
        loads = model_loads(acct, {"m": (a, b), "other": (c,)}, book, {"m", "other", "z", "idle"})
    assert loads == {"m": ModelLoad(inflight=1, waiting=3, running=8, kv_cache=0.75, last_request=42.0),
                     "other": ModelLoad(), "z": ModelLoad(held=1, last_request=42.0), "idle": ModelLoad()}
    report = LoadReport("n1.77", 50.0, loads)
    assert records.LOAD.decode(keys.load_key("n1.77"), json.dumps(report.to_dict()).encode()) == report


def test_an_unloaded_model_leaves_the_report_once_nothing_is_in_flight() -> None:
    acct = LoadAccounting(FakeClock())
    acct.begin("gone")
    assert "gone" in model_loads(acct, {}, LoadBook(3.0), set())
    acct.end("gone")
    assert model_loads(acct, {}, LoadBook(3.0), set()) == {}


@pytest.mark.parametrize(("node", "pid", "want"), [("gpu-01", 123, "gpu-01.123"), ("GPU_01.lab", 9, "gpu_01.lab.9"),
                                                   ("ünï cødé", 1, "n--c-d-.1"), ("", 5, "gateway.5"),
                                                   ("x" * 300, 4194304, "x" * 100 + ".4194304")])
def test_reporter_names_fit_the_contract(node: str, pid: int, want: str) -> None:
    assert reporter_name(node, pid) == want and REPORTER_RE.fullmatch(want)


async def test_the_report_is_published_under_its_own_lease_and_leaves_with_it() -> None:
    store = MemoryStore()
    calls = 0

    def report() -> LoadReport:
        nonlocal calls
        calls += 1
        return LoadReport("n1.1", float(calls), {"m": ModelLoad(inflight=calls)})

    task = asyncio.create_task(publish_loads(store, ClusterWrites(store), report, 0.01, 10))
    await until(lambda: calls >= 3)
    kv = await store.get(keys.load_key("n1.1"))
    assert kv is not None and kv.lease != 0
    assert records.LOAD.decode(kv.key, kv.value).models["m"].inflight >= 2  # refreshed, not written once
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.get(keys.load_key("n1.1")) is None  # the lease was revoked: the report left at once


async def test_a_wake_request_is_created_only_where_none_is() -> None:
    store = MemoryStore()
    writes = ClusterWrites(store)
    assert await writes.request_wake(WakeRequest("z", 1.0, "a.1"))
    assert not await writes.request_wake(WakeRequest("z", 2.0, "b.2"))
    kv = await store.get(keys.wake_key("z"))
    assert kv is not None and kv.version == 1 and kv.lease == 0
    assert records.WAKE.decode(kv.key, kv.value) == WakeRequest("z", 1.0, "a.1")


# --- an elastic model's state ---------------------------------------------------------------------------

@pytest.mark.parametrize(("phases", "waking", "want"), [
    ({}, False, ModelState.IDLE), ({}, True, ModelState.WAKING), ({Phase.FAILED: 1}, False, ModelState.IDLE),
    ({Phase.STARTING: 1}, False, ModelState.WAKING), ({Phase.PENDING: 1}, False, ModelState.WAKING),
    ({Phase.SLEEPING: 2}, False, ModelState.SLEEPING), ({Phase.SLEEPING: 1}, True, ModelState.WAKING),
    ({Phase.READY: 1, Phase.STARTING: 1}, True, ModelState.READY), ({Phase.DRAINING: 1}, False, ModelState.IDLE),
])
def test_model_state(phases: dict[Phase, int], waking: bool, want: ModelState) -> None:
    assert model_state(Counter(phases), waking) is want


@pytest.mark.parametrize(("headers", "streaming", "interval", "want"), [
    ({}, True, 5.0, True), ({}, False, 5.0, False), ({}, True, 0.0, False),
    ({"X-Nebula-Wake-Keepalive": "0"}, True, 5.0, False), ({"X-Nebula-Wake-Keepalive": " Off"}, True, 5.0, False),
    ({"X-Nebula-Wake-Keepalive": "1"}, True, 5.0, True),
])
def test_keepalive_is_for_streams_unless_turned_off(headers: dict[str, str], streaming: bool, interval: float,
                                                     want: bool) -> None:
    assert keepalive_wanted(headers, streaming, interval) is want


# --- the held stream ---------------------------------------------------------------------------------------

class Recorder:
    """A Reply that records what the client would receive."""

    def __init__(self) -> None:
        self.head: tuple[int, list[tuple[str, str]]] | None = None
        self.body = b""
        self.ended = False
        self.aborted = False

    @property
    def status(self) -> int:
        return self.head[0] if self.head else 0

    async def send(self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        self.head, self.body, self.ended = (status, list(headers)), body, True

    async def start(self, status: int, reason: str, headers: Iterable[tuple[str, str]]) -> None:
        self.head = (status, list(headers))

    async def write(self, data: bytes) -> None:
        self.body += data

    async def end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        self.aborted = True


def _events(body: bytes) -> list[list[str]]:
    return [block.split("\n") for block in body.decode().split("\n\n") if block]


async def test_a_held_stream_keeps_alive_then_relays_the_engines_body_under_its_own_head() -> None:
    client = Recorder()
    stream = HeldStream(client, "/v1/chat/completions")
    await stream.begin()
    await stream.keepalive("z")
    await stream.start(200, "OK", [("Content-Type", "text/event-stream"), ("X-Engine", "a")])
    await stream.write(b"data: {\"x\": 1}\n\n")
    await stream.write(b"data: [DONE]\n\n")
    await stream.end()
    assert client.head is not None and client.head[0] == 200 and ("X-Engine", "a") not in client.head[1]
    assert client.body == comment("z") + b"data: {\"x\": 1}\n\ndata: [DONE]\n\n" and client.ended
    assert comment("z") == b": waking z\n\n"


@pytest.mark.parametrize(("path", "first"), [("/v1/chat/completions", "data: "),
                                             ("/v1/messages", "event: error")])
async def test_a_failed_wake_ends_the_stream_with_an_error_event_in_the_clients_shape(path: str, first: str) -> None:
    client = Recorder()
    stream = HeldStream(client, path)
    await stream.begin()
    await stream.fail(ApiError(503, "model 'z' is waking up", code="model_waking"))
    await stream.fail(ApiError(503, "twice"))  # a second failure adds nothing after the end
    (event,) = _events(client.body)
    assert event[0].startswith(first) and client.ended
    data = json.loads(event[-1].removeprefix("data: "))
    if path == "/v1/messages":
        assert data == {"type": "error", "error": {"type": "overloaded_error", "message": "model 'z' is waking up"}}
    else:
        assert data["error"]["code"] == "model_waking" and data["error"]["message"] == "model 'z' is waking up"


@pytest.mark.parametrize("whole", [True, False])
async def test_an_engines_error_after_the_head_becomes_an_error_event(whole: bool) -> None:
    client = Recorder()
    stream = HeldStream(client, "/v1/completions")
    await stream.begin()
    engine_error = json.dumps({"error": {"message": "too long", "type": "BadRequestError", "code": 400}}).encode()
    if whole:
        await stream.send(400, "", [], engine_error)
    else:
        await stream.start(400, "", [])
        await stream.write(engine_error)
        await stream.end()
    assert _events(client.body) == [["data: " + engine_error.decode()]] and client.ended
    plain = Recorder()
    stream = HeldStream(plain, "/v1/completions")
    await stream.send(502, "", [], b"Bad Gateway")
    (event,) = _events(plain.body)
    assert json.loads(event[0].removeprefix("data: "))["error"]["message"] == "Bad Gateway"


# --- the configuration's bounds ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("wake_wait_s = 0", "gateway.wake_wait_s: must be more than 0 seconds"),
    ("wake_wait_s = -5", "gateway.wake_wait_s: must be more than 0 seconds"),
    ("load_report_s = -1", "gateway.load_report_s: must be 0 or more"),
    ("wake_keepalive_s = -0.5", "gateway.wake_keepalive_s: must be 0 or more"),
    ("max_held_requests = -1", "gateway.max_held_requests: must be 0 or more"),
])
def test_bad_wake_settings_are_one_line_naming_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_text(f"[gateway]\n{text}\n", {}, "nebula.toml")
    assert str(e.value).startswith(f"nebula.toml: {expected}") and "\n" not in str(e.value)


def test_the_defaults_hold_a_cold_gpu_start_and_keep_streams_alive() -> None:
    gw = parse_config_text("", {}, "nebula.toml").gateway
    assert (gw.load_report_s, gw.wake_wait_s, gw.max_held_requests, gw.wake_keepalive_s) == (2.0, 300.0, 1024, 5.0)
