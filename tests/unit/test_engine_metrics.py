"""Reading an engine's load: parsing vLLM's /metrics text, fetching it, and the gateway's book and poll."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from nebula.adapters.engine_metrics import EngineMetricsError, fetch_engine_load, parse_engine_load
from nebula.core.engine_load import EngineLoad
from nebula.services.gateway.load import LoadBook, poll_loads, poll_round
from tests.unit.fake_engine import FakeEngine, engines, vllm_metrics_text

# The head of a vLLM 0.32 /metrics page (one engine, model tiny-llama, 2 running, 5 waiting), as served:
# process series, the load gauges among counters and histograms, a near-miss name (the per-reason queue)
# that must not count as the queue itself.
VLLM_SAMPLE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 14423.0
python_gc_objects_collected_total{generation="1"} 3711.0
python_gc_objects_collected_total{generation="2"} 312.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 3.081330688e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 5.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-llama",reason="capacity"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.4375
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny-llama"} 20480.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="tiny-llama"} 1.7647108e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",\
gpu_memory_utilization="0.92",num_gpu_blocks="27423"} 1.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny-llama"} 0.8421
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny-llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.005",model_name="tiny-llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="tiny-llama"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="tiny-llama"} 11.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="tiny-llama"} 30.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny-llama"} 31.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-llama"} 31.0
"""


# --- parse_engine_load -----------------------------------------------------------------------------------

def test_parses_the_load_gauges_of_a_vllm_page() -> None:
    assert parse_engine_load(VLLM_SAMPLE) == EngineLoad(waiting=5.0, running=2.0, kv_cache_usage=0.4375)


def test_label_sets_of_one_server_add_up_and_kv_is_the_fullest_engine() -> None:
    text = vllm_metrics_text("tiny-llama", waiting=3, running=2, kv_usage=0.5, engines=("0", "1"))
    text += ('vllm:kv_cache_usage_perc{engine="2",model_name="tiny-llama"} 0.75\n'
             'vllm:num_requests_waiting{engine="2",model_name="tiny-llama"} 1\n')
    assert parse_engine_load(text) == EngineLoad(waiting=7.0, running=4.0, kv_cache_usage=0.75)


def test_what_prometheus_client_writes_parses() -> None:
    text = vllm_metrics_text("m", waiting=4, running=1, kv_usage=0.25)
    assert parse_engine_load(text) == EngineLoad(waiting=4.0, running=1.0, kv_cache_usage=0.25)


def test_a_missing_gauge_counts_zero_and_nan_is_skipped() -> None:
    text = ('vllm:num_requests_running{engine="0",model_name="m"} 3\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} NaN\n')
    assert parse_engine_load(text) == EngineLoad(waiting=0.0, running=3.0, kv_cache_usage=0.0)


def test_nonsense_values_are_clamped() -> None:
    text = ('vllm:num_requests_waiting{engine="0",model_name="m"} -4\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 1.5\n')
    assert parse_engine_load(text) == EngineLoad(waiting=0.0, running=0.0, kv_cache_usage=1.0)


@pytest.mark.parametrize("text", ["", "# nothing here\n", "process_open_fds 6.0\n",
                                  "vllm:num_requests_waiting_by_reason{reason=\"capacity\"} 5\n"])
def test_no_load_gauges_is_an_error(text: str) -> None:
    with pytest.raises(EngineMetricsError, match="no vLLM load gauges"):
        parse_engine_load(text)


@pytest.mark.parametrize("text", ['vllm:num_requests_waiting{engine="0" 3.0\n', "vllm:num_requests_waiting abc\n"])
def test_malformed_text_is_an_error(text: str) -> None:
    with pytest.raises(EngineMetricsError, match="malformed"):
        parse_engine_load(text)


# --- fetch_engine_load (real loopback server) -----------------------------------------------------------

@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async for started in engines("a"):
        yield started[0]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Like the gateway's session: no decompression, which is why the fetch must ask for identity.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def test_fetch_reads_the_engine_load(engine: FakeEngine, http: aiohttp.ClientSession) -> None:
    engine.waiting, engine.running, engine.kv_usage = 7, 3, 0.5
    load = await fetch_engine_load(http, engine.endpoint + "/", 2.0)
    assert load == EngineLoad(waiting=7.0, running=3.0, kv_cache_usage=0.5)


async def test_fetch_failures_are_engine_metrics_errors(engine: FakeEngine, http: aiohttp.ClientSession) -> None:
    engine.metrics_status = 500
    with pytest.raises(EngineMetricsError, match="answered 500"):
        await fetch_engine_load(http, engine.endpoint, 2.0)
    engine.metrics_status, engine.metrics_hold = None, asyncio.Event()
    with pytest.raises(EngineMetricsError, match="unreachable"):
        await fetch_engine_load(http, engine.endpoint, 0.05)
    await engine.stop()
    with pytest.raises(EngineMetricsError, match="unreachable"):
        await fetch_engine_load(http, engine.endpoint, 2.0)


# --- LoadBook and the poll (controllable clock, no sleeps) ----------------------------------------------

class FakeFetch:
    """Answers from a dict; an endpoint mapped to None fails."""

    def __init__(self, answers: dict[str, EngineLoad | None]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, endpoint: str) -> EngineLoad:
        self.calls.append(endpoint)
        load = self.answers[endpoint]
        if load is None:
            raise EngineMetricsError("down")
        return load


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


LOAD_A, LOAD_B = EngineLoad(1, 2, 0.1), EngineLoad(5, 6, 0.9)


async def test_poll_round_records_every_endpoint() -> None:
    book, clock = LoadBook(max_age_s=3.0), Clock()
    await poll_round({"a", "b"}, book, FakeFetch({"a": LOAD_A, "b": LOAD_B}), clock)
    assert book.loads() == {"a": LOAD_A, "b": LOAD_B}
    sample = book.sample("a")
    assert sample is not None and sample.at == 100.0


async def test_failed_poll_keeps_the_last_sample_until_it_is_too_old() -> None:
    book, clock = LoadBook(max_age_s=3.0), Clock()
    fetch = FakeFetch({"a": LOAD_A})
    await poll_round({"a"}, book, fetch, clock)
    fetch.answers["a"] = None
    for t in (101.0, 102.0):
        clock.now = t
        await poll_round({"a"}, book, fetch, clock)
        assert book.loads() == {"a": LOAD_A}
    clock.now = 103.0
    await poll_round({"a"}, book, fetch, clock)
    assert book.loads() == {} and book.sample("a") is None
    assert book.failures == 3
    await poll_round({"a"}, book, fetch, clock)  # never polled successfully: stays unknown, no error
    assert book.sample("a") is None


async def test_endpoints_that_left_are_forgotten() -> None:
    book, clock = LoadBook(max_age_s=3.0), Clock()
    fetch = FakeFetch({"a": LOAD_A, "b": LOAD_B})
    await poll_round({"a", "b"}, book, fetch, clock)
    await poll_round({"b"}, book, fetch, clock)
    assert book.loads() == {"b": LOAD_B}


async def test_poll_loads_keeps_the_interval_and_survives_a_broken_round() -> None:
    book, clock = LoadBook(max_age_s=3.0), Clock()
    fetch = FakeFetch({"a": LOAD_A})
    delays: list[float] = []
    rounds = iter([{"a"}, None, {"a"}])

    def endpoints() -> set[str]:
        got = next(rounds)
        if got is None:
            raise RuntimeError("bug in a round")
        clock.now += 0.25  # the round takes 0.25 s of the interval
        return got

    class Stop(Exception):
        pass

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 3:
            raise Stop

    with pytest.raises(Stop):
        await poll_loads(endpoints, book, fetch, 1.0, clock, sleep)
    assert delays == [0.75, 1.0, 0.75]
    assert fetch.calls == ["a", "a"]
    assert book.loads() == {"a": LOAD_A}
