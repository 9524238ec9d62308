"""GPU series of the node agent, from readings fed through a fake reader (the collector and sampler are
pure logic); and NVML itself on this machine, which has no GPU: no readings, a reason, no crash."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nebula.adapters.nvml import GpuReading, read_gpus
from nebula.services.agent.gpus import GpuCollector, GpuSampler

H100 = GpuReading(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-1111", memory_total_bytes=80 * 2**30,
                  memory_used_bytes=72 * 2**30, utilization=0.87, temperature_c=61.0, power_w=512.5,
                  power_limit_w=700.0)
# A board that reports neither utilisation (MIG) nor power: those series are absent, the others stay.
BARE = GpuReading(index=1, name="NVIDIA A100", uuid="GPU-2222", memory_total_bytes=40 * 2**30,
                  memory_used_bytes=0, temperature_c=40.0)


class Reader:
    def __init__(self, *answers: tuple[tuple[GpuReading, ...], str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> tuple[tuple[GpuReading, ...], str]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def labels(g: GpuReading) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"node": "n1", "gpu": str(g.index), "uuid": g.uuid, "name": g.name}.items()))


def test_gpu_series_per_gpu_from_the_latest_sample() -> None:
    sampler = GpuSampler(Reader(((H100, BARE), "")), "n1")
    registry = CollectorRegistry()
    registry.register(GpuCollector(sampler))
    assert not any(name.startswith("nebula_gpu") for name, _ in series(registry))  # nothing sampled yet

    sampler.sample()
    got = series(registry)
    assert got[("nebula_gpu_utilization_ratio", labels(H100))] == 0.87
    assert got[("nebula_gpu_memory_used_bytes", labels(H100))] == 72 * 2**30
    assert got[("nebula_gpu_memory_total_bytes", labels(H100))] == 80 * 2**30
    assert got[("nebula_gpu_temperature_celsius", labels(H100))] == 61.0
    assert got[("nebula_gpu_power_watts", labels(H100))] == 512.5
    assert got[("nebula_gpu_power_limit_watts", labels(H100))] == 700.0
    assert got[("nebula_gpu_memory_total_bytes", labels(BARE))] == 40 * 2**30
    assert got[("nebula_gpu_temperature_celsius", labels(BARE))] == 40.0
    assert ("nebula_gpu_utilization_ratio", labels(BARE)) not in got
    assert ("nebula_gpu_power_watts", labels(BARE)) not in got


def test_no_gpus_no_series_and_one_log_line_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    reader = Reader(((), "NVML unavailable (NVML Shared Library Not Found)"),
                    ((), "NVML unavailable (NVML Shared Library Not Found)"),
                    ((H100,), ""),
                    ((), "NVML read failed (GPU is lost)"))
    sampler = GpuSampler(reader, "n1")
    registry = CollectorRegistry()
    registry.register(GpuCollector(sampler))
    with caplog.at_level(logging.INFO, logger="nebula.agent"):
        sampler.sample()
        sampler.sample()
        text = generate_latest(registry).decode()
        assert "nebula_gpu" not in text
        sampler.sample()
        assert ("nebula_gpu_power_watts", labels(H100)) in series(registry)
        sampler.sample()  # the GPU fell off the bus: its series go, the reason is logged
        assert "nebula_gpu" not in generate_latest(registry).decode()
    notes = [r.getMessage() for r in caplog.records if "GPU" in r.getMessage()]
    assert notes == ["no GPUs on this node: NVML unavailable (NVML Shared Library Not Found)",
                     "no GPUs on this node: NVML read failed (GPU is lost)"]


async def test_sampler_run_keeps_sampling_after_a_failed_read() -> None:
    calls: list[int] = []

    def flaky() -> tuple[tuple[GpuReading, ...], str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("driver hiccup")
        return (H100,), ""

    sampler = GpuSampler(flaky, "n1")
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == 2:
            raise StopAsyncIteration  # ends the endless loop from inside, after two rounds

    with pytest.raises(StopAsyncIteration):
        await sampler.run(5.0, sleep)
    assert slept == [5.0, 5.0]
    assert sampler.readings == (H100,)


def test_nvml_on_a_machine_without_gpus_reports_none_and_why() -> None:
    readings, note = read_gpus()
    # This machine has no GPU driver: no readings and a reason. (On a GPU host: readings and no note.)
    assert (readings == ()) == bool(note)
    if not readings:
        assert note.startswith(("NVML unavailable", "nvidia-ml-py is not installed", "NVML read failed"))
