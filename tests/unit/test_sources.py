"""Model sources: parsing, and ModelSources' download jobs (one per source, progress at most once a second,
backoff on passing failures, permanent failures, the on-disk index) with a scripted fetcher and clock.
The real hub clients are tested against a local mirror in tests/integration/test_downloads.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nebula.core.model import ModelSpec
from nebula.core.sources import SourceForm, SourceKind, SourceRef, parse_source, source_form, source_id
from nebula.errors import PermanentError, TemporaryError, ValidationError
from nebula.services.agent.sources import (
    Broken,
    DownloadMetrics,
    Fetching,
    ModelSources,
    Progress,
    Ready,
    describe,
)


def test_parse_forms() -> None:
    assert parse_source("org/name") == SourceRef(SourceKind.HF, "org/name")
    assert parse_source("hf://org/name", "v1").id == "hf://org/name@v1"
    assert parse_source("modelscope://Qwen/Qwen2-0.5B").id == "modelscope://Qwen/Qwen2-0.5B"
    assert parse_source("/models/x") == SourceRef(SourceKind.LOCAL, "/models/x")
    assert parse_source("file:///models/x").id == "file:///models/x"
    assert source_id("org/name") == source_id("hf://org/name") == "hf://org/name"
    assert source_id("/models/x") is None


@pytest.mark.parametrize("bad", ["llama", "hf://llama", "modelscope://a/b/c", "https://x/y", "a b/c", ""])
def test_parse_rejects_with_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ValidationError) as e:
        parse_source(bad)
    assert e.value.field == "source"


def test_model_spec_rejects_an_unknown_source() -> None:
    with pytest.raises(ValidationError, match="not a model source"):
        ModelSpec.from_dict({"name": "m", "source": "llama"})
    with pytest.raises(ValidationError, match="revision"):
        ModelSpec.from_dict({"name": "m", "source": "org/m", "revision": "../x"})
    assert ModelSpec.from_dict({"name": "m", "source": "org/m", "revision": "v2"}).source_id == "hf://org/m@v2"


def test_describe() -> None:
    assert describe(0, 0) == "downloading (listing files)"
    assert describe(int(1.2 * 2**30), int(2.8 * 2**30)) == "downloading 42% (1.2/2.8 GiB)"
    assert describe(2 * 2**20, 5 * 2**20) == "downloading 40% (2.0/5.0 MiB)"


class ScriptedFetcher:
    """Each fetch blocks until the test releases it, then reports progress and ends as the script says."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls = 0
        self.outcomes: list[BaseException | None] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.progress: Progress | None = None

    def fetch(self, ref: SourceRef, cache_dir: Path, progress: Progress) -> Path:
        self.calls += 1
        self.progress = progress
        progress(0, 1000)
        self.started.set()
        assert self.release.wait(10), "the test never released the fetch"
        self.release.clear()
        self.started.clear()
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        path = cache_dir / ref.location
        path.mkdir(parents=True, exist_ok=True)
        progress(1000, 1000)
        return path


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, fetcher: ScriptedFetcher, clock: Clock) -> ModelSources:
    return ModelSources(tmp_path / "cache", {SourceKind.HF: fetcher}, DownloadMetrics.create(CollectorRegistry()),
                        clock=clock, retry_base_s=2.0, retry_max_s=5.0)


async def test_one_download_per_source_with_throttled_progress(tmp_path: Path) -> None:
    fetcher, clock = ScriptedFetcher(tmp_path), Clock()
    sources = make(tmp_path, fetcher, clock)
    first = sources.resolve("org/m")
    assert isinstance(first, Fetching)
    assert fetcher.started.wait(5)
    assert isinstance(sources.resolve("hf://org/m"), Fetching)  # another spelling, another replica: same job
    assert fetcher.progress is not None
    fetcher.progress(430, 1000)
    clock.now += 0.5
    assert sources.resolve("org/m") == first, "progress is published at most once a second"
    clock.now += 0.6
    shown = sources.resolve("org/m")
    assert isinstance(shown, Fetching) and shown.progress == 0.43 and "43%" in shown.message
    assert sources.downloading() == ["hf://org/m"]
    fetcher.release.set()
    await sources.wait_idle()
    ready = sources.resolve("org/m")
    assert isinstance(ready, Ready) and ready.path == str(tmp_path / "cache" / "hf" / "org" / "m")
    assert fetcher.calls == 1 and sources.cached() == ("hf://org/m",)

    again = make(tmp_path, fetcher, clock)  # a restarted agent: the index answers, nothing is fetched
    assert again.cached() == ("hf://org/m",)
    assert again.resolve("org/m") == ready and fetcher.calls == 1


async def test_passing_failures_back_off_on_the_clock_then_succeed(tmp_path: Path) -> None:
    fetcher, clock = ScriptedFetcher(tmp_path), Clock()
    fetcher.outcomes = [TemporaryError("hub answered 503"), TemporaryError("hub answered 503")]
    sources = make(tmp_path, fetcher, clock)
    for attempt, delay in ((1, 2.0), (2, 4.0)):
        sources.resolve("org/m")
        assert fetcher.started.wait(5)
        fetcher.release.set()
        await sources.wait_idle()
        waiting = sources.resolve("org/m")
        assert isinstance(waiting, Fetching) and f"failed ({attempt} time(s))" in waiting.message
        assert "503" in waiting.message and fetcher.calls == attempt
        clock.now += delay - 0.1
        sources.resolve("org/m")
        assert fetcher.calls == attempt, "retried before its backoff ended"
        clock.now += 0.1
    sources.resolve("org/m")  # the third try
    assert fetcher.started.wait(5)
    fetcher.release.set()
    await sources.wait_idle()
    assert isinstance(sources.resolve("org/m"), Ready) and fetcher.calls == 3


async def test_permanent_failure_is_broken_until_nothing_asks_for_it(tmp_path: Path) -> None:
    fetcher, clock = ScriptedFetcher(tmp_path), Clock()
    fetcher.outcomes = [PermanentError("hf://org/gone: no such repo on the hub")]
    sources = make(tmp_path, fetcher, clock)
    sources.resolve("org/gone")
    assert fetcher.started.wait(5)
    fetcher.release.set()
    await sources.wait_idle()
    clock.now += 3600
    assert sources.resolve("org/gone") == Broken("hf://org/gone: no such repo on the hub")
    assert fetcher.calls == 1
    sources.forget_unused(set())  # the model was unloaded: a later load tries again
    assert isinstance(sources.resolve("org/gone"), Fetching)
    assert fetcher.started.wait(5)
    fetcher.release.set()
    await sources.wait_idle()
    assert fetcher.calls == 2


def test_local_sources_and_unconfigured_kinds(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    sources = make(tmp_path, ScriptedFetcher(tmp_path), Clock())
    assert sources.resolve(str(model)) == Broken(f"source path {model} has no config.json: not a model directory")
    (model / "config.json").write_text("{}")
    assert sources.resolve(f"file://{model}") == Ready(str(model))
    assert sources.resolve("/nope") == Broken("source path /nope does not exist on this node")
    assert sources.resolve("modelscope://org/m") == Broken(
        "modelscope://org/m: downloads from modelscope are not configured on this node")
    assert isinstance(sources.resolve("not a source"), Broken)


def test_how_the_cli_reads_a_source() -> None:
    def form(text: str, exists: bool = False, first: bool = False) -> SourceForm:
        return source_form(text, exists=exists, first_part_exists=first)

    assert form("hf://org/x") is SourceForm.HUB and form("modelscope://org/x") is SourceForm.HUB
    assert form("/models/x") is SourceForm.ABSOLUTE and form("file:///models/x") is SourceForm.ABSOLUTE
    assert form("org/x") is SourceForm.HUB
    for existing in ("org/x", "models", "./m", "a/b/c"):
        assert form(existing, exists=True) is SourceForm.RELATIVE
    for missing in ("./m", "../m", "a/b/c", "org/x/", "."):
        with pytest.raises(ValidationError, match="no such directory here"):
            form(missing)
    with pytest.raises(ValidationError, match="ambiguous"):
        form("models/x", first=True)
