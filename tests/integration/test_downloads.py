"""Hub downloads through a local mirror (tests/harness/hub_mirror.py): the real `huggingface_hub` code and
the agent's ModelScope client, the agent's download jobs, its phases and its pull intents.

Needs NEBULA_TEST_MODELS (the tiny models, scripts/make_tiny_models.py); no etcd, no engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import NebulaConfig, NodeConfig
from nebula.core.model import ModelSpec, NodeRecord, Placement, dumps
from nebula.core.pulls import PullIntent
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.sources import Broken, Fetching, ModelSources, Ready, build_sources
from nebula.services.agent.specfiles import SpecFiles
from tests.harness.cluster import required_path
from tests.harness.hub_mirror import HubMirror, running_mirror, tiny_repos
from tests.harness.mirrors import listing, mirrored
from tests.unit.test_agent import TableUnits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def repos() -> dict[str, Path]:
    return tiny_repos(Path(required_path("NEBULA_TEST_MODELS")))


@pytest.fixture
def mirror(repos: dict[str, Path]) -> Iterator[HubMirror]:
    with running_mirror(repos) as m:
        yield m


def sources_for(mirror: HubMirror, cache: Path, clock: Clock | None = None, **node: str) -> ModelSources:
    cfg = NodeConfig(cache_dir=str(cache), hf_endpoint=mirror.url, modelscope_endpoint=mirror.url, **node)  # type: ignore[arg-type]
    return build_sources(cfg, CollectorRegistry(), clock=clock or Clock())


async def settle(sources: ModelSources, source: str, revision: str | None = None) -> Ready | Broken | Fetching:
    sources.resolve(source, revision)
    await sources.wait_idle()
    return sources.resolve(source, revision)


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


async def test_hf_download_lands_in_the_cache_once(tmp_path: Path, mirror: HubMirror, repos: dict[str, Path]) -> None:
    sources = sources_for(mirror, tmp_path / "cache")
    first = sources.resolve("hf://tiny/llama")
    assert isinstance(first, Fetching)
    assert isinstance(sources.resolve("tiny/llama"), Fetching)  # a second replica joins the same download
    await sources.wait_idle()
    ready = sources.resolve("tiny/llama")
    assert isinstance(ready, Ready)
    path = Path(ready.path)
    assert path.is_relative_to(tmp_path / "cache" / "hf") and path.name == mirror.commit("tiny/llama")
    assert same_tree(path, repos["tiny/llama"])
    assert mirror.file_requests("tiny/llama") == 6  # every file once, though two asked
    assert sources.cached() == ("hf://tiny/llama",)

    before = len(mirror.requests)
    assert sources.resolve("hf://tiny/llama") == ready
    restarted = sources_for(mirror, tmp_path / "cache")
    assert restarted.resolve("tiny/llama") == ready
    assert len(mirror.requests) == before, "a cached source must not touch the hub"


async def test_missing_repo_and_revision_fail_permanently(tmp_path: Path, mirror: HubMirror) -> None:
    sources = sources_for(mirror, tmp_path / "cache")
    assert await settle(sources, "hf://tiny/nope") == Broken(
        "hf://tiny/nope: no such repo on the hub (or it is private: set node.hf_token_file)")
    assert await settle(sources, "tiny/llama", "v9") == Broken(
        "hf://tiny/llama@v9: revision 'v9' does not exist in the repo")
    assert await settle(sources, "modelscope://tiny/nope") == Broken(
        "modelscope://tiny/nope: no such repo, revision or file on ModelScope (the file list)")


async def test_token_file_opens_a_private_mirror(tmp_path: Path, repos: dict[str, Path]) -> None:
    token = tmp_path / "hf.token"
    token.write_text("s3cret\n")
    with running_mirror(repos, token="s3cret") as m:
        without = sources_for(m, tmp_path / "a")
        assert isinstance(await settle(without, "tiny/llama"), Broken)
        wrong = tmp_path / "wrong.token"
        wrong.write_text("nope")
        refused = await settle(sources_for(m, tmp_path / "b", hf_token_file=str(wrong)), "tiny/llama")
        assert refused == Broken("hf://tiny/llama: the hub refused access (HTTP 401): check node.hf_token_file")
        with_token = sources_for(m, tmp_path / "c", hf_token_file=str(token))
        assert isinstance(await settle(with_token, "tiny/llama"), Ready)


async def test_a_flaky_hub_is_retried_after_a_backoff(tmp_path: Path, repos: dict[str, Path]) -> None:
    clock = Clock()
    with running_mirror(repos, fail_next=1) as m:
        sources = sources_for(m, tmp_path / "cache", clock)
        waiting = await settle(sources, "tiny/bert-embed")
        assert isinstance(waiting, Fetching) and "failed (1 time(s)), retrying in 2 s" in waiting.message
        assert "503" in waiting.message
        clock.now += 2
        assert isinstance(await settle(sources, "tiny/bert-embed"), Ready)


async def test_modelscope_download(tmp_path: Path, mirror: HubMirror, repos: dict[str, Path]) -> None:
    sources = sources_for(mirror, tmp_path / "cache")
    ready = await settle(sources, "modelscope://tiny/bert-embed")
    assert isinstance(ready, Ready)
    assert same_tree(Path(ready.path), repos["tiny/bert-embed"])  # 1_Pooling/ included
    assert not list((tmp_path / "cache" / "modelscope").rglob("*.partial"))
    assert sources.cached() == ("modelscope://tiny/bert-embed",)


# --- the agent: phases while downloading, the node record, pulls ------------------------------------


async def make_agent(tmp_path: Path, store: MemoryStore, mirror: HubMirror) -> NodeAgent:
    cfg = NebulaConfig(node=NodeConfig(cache_dir=str(tmp_path / "cache"), hf_endpoint=mirror.url))
    node = NodeRecord(name="n1", address="127.0.0.1", port_min=18000, port_max=18010)

    async def health(endpoint: str) -> bool:
        return False

    agent = NodeAgent(cfg, node, store, TableUnits(), SpecFiles(str(tmp_path / "run")), health, CollectorRegistry())
    await agent.on_new_lease(await store.grant_lease(10))
    return agent


async def status(store: MemoryStore, key: str) -> dict[str, object]:
    kv = await store.get(key)
    assert kv is not None, key
    return dict(json.loads(kv.value))


async def test_agent_reports_download_progress_then_starts_from_the_cache(tmp_path: Path,
                                                                          repos: dict[str, Path]) -> None:
    store = MemoryStore()
    with running_mirror(repos, bytes_per_s=2_000_000) as m:  # ~3 s for tiny/llama: time to watch it
        agent = await make_agent(tmp_path, store, m)
        spec = ModelSpec.from_dict({"name": "llama", "source": "hf://tiny/llama"})
        p = Placement(instance="llama", node="n1", model=spec, port=18000)
        await store.put(keys.placement_key("n1", "llama"), dumps(p.to_dict()))
        agent.on_placements(mirrored(records.PLACEMENTS, await listing(store, keys.node_placements_prefix("n1"))))
        await agent.reconcile_once()
        st = await status(store, keys.instance_key("llama"))
        assert st["phase"] == "downloading" and str(st["message"]).startswith("downloading")
        assert isinstance(st["progress"], float) and 0.0 <= st["progress"] < 1.0
        assert agent.status_line().startswith("1 instance(s); hf://tiny/llama: downloading")
        assert agent._next_wait(30.0) == 1.0, "a download in progress is polled every second"
        await agent.sources.wait_idle()
        await agent.reconcile_once()
    st = await status(store, keys.instance_key("llama"))
    assert st["phase"] == "starting" and st["progress"] is None
    written = json.loads((tmp_path / "run/engines/llama.json").read_text())
    assert written["source"].startswith(str(tmp_path / "cache" / "hf" / "models--tiny--llama" / "snapshots"))
    node = await status(store, keys.node_key("n1"))
    assert node["cached"] == ["hf://tiny/llama"]


async def test_agent_fails_an_instance_whose_repo_does_not_exist(tmp_path: Path, mirror: HubMirror) -> None:
    store = MemoryStore()
    agent = await make_agent(tmp_path, store, mirror)
    spec = ModelSpec.from_dict({"name": "ghost", "source": "tiny/ghost"})
    key = keys.placement_key("n1", "ghost")
    await store.put(key, dumps(Placement(instance="ghost", node="n1", model=spec, port=18000).to_dict()))
    agent.on_placements(mirrored(records.PLACEMENTS, await listing(store, keys.node_placements_prefix("n1"))))
    await agent.reconcile_once()
    await agent.sources.wait_idle()
    await agent.reconcile_once()
    st = await status(store, keys.instance_key("ghost"))
    assert st["phase"] == "failed" and "hf://tiny/ghost: no such repo on the hub" in str(st["message"])


async def test_pull_intent_fetches_and_reports(tmp_path: Path, mirror: HubMirror) -> None:
    store = MemoryStore()
    agent = await make_agent(tmp_path, store, mirror)
    intent = PullIntent.new("n1", "tiny/bert-rerank", None, 1.0)
    key = keys.pull_key("n1", intent.id)
    await store.put(key, dumps(intent.to_dict()))
    agent.on_pulls(mirrored(records.PULLS, await listing(store, keys.node_pulls_prefix("n1"))))
    agent.on_placements(mirrored(records.PLACEMENTS))
    await agent.reconcile_once()
    assert (await status(store, keys.pull_status_key("n1", intent.id)))["phase"] == "downloading"
    await agent.sources.wait_idle()
    await agent.reconcile_once()
    st = await status(store, keys.pull_status_key("n1", intent.id))
    assert st["phase"] == "ready" and st["source"] == "hf://tiny/bert-rerank" and st["progress"] == 1.0
    assert (await status(store, keys.node_key("n1")))["cached"] == ["hf://tiny/bert-rerank"]
    await store.delete(key)
    agent.on_pulls(mirrored(records.PULLS))
    await agent.reconcile_once()
    assert await store.get(keys.pull_status_key("n1", intent.id)) is None
