"""Where things listen by default: every service on loopback, engines on the node's configured engine_host
(what `nebula node join` sets to the address the gateway reaches them at), never on all interfaces."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.sdnotify import Notifier
from nebula.core import keys, records
from nebula.core.config import EngineConfig, GatewayConfig, NebulaConfig, NodeConfig, config_template
from nebula.core.engine_spec import vllm_command
from nebula.core.model import ModelSpec, NodeRecord, Placement, dumps
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.specfiles import SpecFiles
from nebula.services.gateway.app import serve_gateway
from tests.harness.mirrors import listing, mirrored
from tests.harness.ports import free_port, listening
from tests.unit.fake_engine import until
from tests.unit.test_agent import TableUnits, model_dir

ADDRESS_KEYS = {"host", "address", "engine_host"}


def test_every_listen_or_reach_address_defaults_to_loopback() -> None:
    found = {(s, k): v for s, k, _, v in config_template() if k in ADDRESS_KEYS}
    assert {k for _, k in found} == ADDRESS_KEYS and len(found) >= 5  # gateway, scheduler, node (x3)
    assert all(ipaddress.ip_address(v).is_loopback for v in found.values()), found
    endpoints = NebulaConfig().cluster.etcd_endpoints
    assert all(ep.startswith("http://127.0.0.1:") for ep in endpoints), endpoints


async def test_the_gateway_listens_on_loopback_only_by_default() -> None:
    port = free_port()
    cfg = NebulaConfig(gateway=GatewayConfig(port=port, admin_key_digest_file=""))
    task = asyncio.create_task(serve_gateway(cfg, MemoryStore(), CollectorRegistry(), Notifier({})))
    try:
        await until(lambda: bool(listening(port)))
        assert listening(port) == ["127.0.0.1"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def engine_host_of(tmp_path: Path, node_cfg: NodeConfig) -> str:
    store = MemoryStore()
    node = NodeRecord(name="n1", address=node_cfg.address, port_min=18000, port_max=18010)

    async def health(_: str) -> bool:
        return False

    agent = NodeAgent(NebulaConfig(node=node_cfg), node, store, TableUnits(), SpecFiles(str(tmp_path / "run")),
                      health, CollectorRegistry(), clock=lambda: 1000.0)
    await agent.on_new_lease(await store.grant_lease(10))
    p = Placement(instance="m", node="n1", model=ModelSpec(name="m", source=model_dir(tmp_path)), port=18000)
    await store.put(keys.placement_key("n1", "m"), dumps(p.to_dict()))
    agent.on_placements(mirrored(records.PLACEMENTS, await listing(store, keys.node_placements_prefix("n1"))))
    specs, blocked = agent.desired()
    assert not blocked
    argv, _ = vllm_command(specs["m"], EngineConfig(), cpu=True)
    host = argv[argv.index("--host") + 1]
    assert host == specs["m"].host
    return host


@pytest.fixture
def two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return tmp_path / "a", tmp_path / "b"


async def test_engines_bind_the_node_s_engine_host(two_dirs: tuple[Path, Path]) -> None:
    assert await engine_host_of(two_dirs[0], NodeConfig()) == "127.0.0.1"
    joined = NodeConfig(address="10.0.0.7", engine_host="10.0.0.7")  # as `nebula node join` writes it
    assert await engine_host_of(two_dirs[1], joined) == "10.0.0.7"
