"""engine_args pass only through [engine] allowed_engine_args, read as vLLM's parser reads them; some flags never
pass; trust_remote_code is the spec's own boolean that the config must permit. Checked at the admin API (400),
by the agent (the instance is refused, with the reason) and by the engine before it starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import EngineConfig, GatewayConfig, NebulaConfig, NodeConfig, parse_config
from nebula.core.engine_args import DEFAULT_ALLOWED_ENGINE_ARGS, check_engine_args, flag_name
from nebula.core.engine_spec import EngineSpec, vllm_command
from nebula.core.model import ModelSpec, NodeRecord, Placement, dumps
from nebula.errors import ConfigError, ValidationError
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.specfiles import SpecFiles
from nebula.services.engine.supervisor import ExitCode, run_engine
from nebula.services.gateway.app import build_gateway_app
from tests.harness.gateway_server import GatewayServer
from tests.harness.mirrors import listing, mirrored
from tests.unit.test_agent import TableUnits, model_dir

HOSTILE = [
    ["--trust-remote-code"], ["--trust_remote_code"], ["--trust-remote"], ["--no-trust-remote-code"],
    ["--middleware", "evil:app"], ["--middleware=evil:app"], ["--host", "0.0.0.0"], ["--host=0.0.0.0"],
    ["--HOST=0.0.0.0"], ["--ho", "0.0.0.0"], ["--port", "1"], ["--served-model-name", "other"],
    ["--served_model_name=other"], ["--allowed-local-media-path", "/"], ["--api-key", "x"], ["--config", "/x.yaml"],
    ["--uds", "/tmp/s"], ["--dtype", "float16", "--host", "0.0.0.0"], ["--tool-parser-plugin", "/x.py"],
    ["--compilation-config.x=1"], ["--"], ["-O3"], ["--seed 1"],
]
HARMLESS = [
    ["--dtype", "float16"], ["--dtype=float16"], ["--max_num_seqs", "8"], ["--seed", "-1"],
    ["--enforce-eager"], ["--no-enable-prefix-caching"], ["--tool-call-parser=pythonic", "--enable-auto-tool-choice"],
    ["--structured-outputs-config={\"backend\":\"xgrammar\"}"], ["--limit-mm-per-prompt", "{\"image\": 2}"],
]


@pytest.mark.parametrize("args", HOSTILE)
def test_hostile_engine_args_are_refused_naming_the_flag(args: list[str]) -> None:
    with pytest.raises(ValidationError) as e:
        check_engine_args(args, DEFAULT_ALLOWED_ENGINE_ARGS)
    assert e.value.field == "engine_args"
    assert any(repr(flag_name(a)) in str(e.value) for a in args if flag_name(a)), e.value


@pytest.mark.parametrize("args", HARMLESS)
def test_harmless_tuning_flags_pass_in_either_form(args: list[str]) -> None:
    check_engine_args(args, DEFAULT_ALLOWED_ENGINE_ARGS)


def test_the_operator_extends_the_list_but_never_with_nebula_s_own_flags() -> None:
    cfg = parse_config({"engine": {"allowed_engine_args": [*DEFAULT_ALLOWED_ENGINE_ARGS, "--max-model-len"]}}, {})
    check_engine_args(["--max-model-len=128"], cfg.engine.allowed_engine_args)
    for bad in ("--host", "--trust-remote", "max-num-seqs", "--max_num_seqs"):
        with pytest.raises(ConfigError, match=r"engine\.allowed_engine_args\[0\]"):
            parse_config({"engine": {"allowed_engine_args": [bad]}}, {})
    # Even a list that named --host could not let it through.
    with pytest.raises(ValidationError, match="cannot be set"):
        check_engine_args(["--host", "0.0.0.0"], ("--host",))


def test_trust_remote_code_is_a_spec_field_the_config_must_permit() -> None:
    spec = ModelSpec.from_dict({"name": "m", "source": "/models/m", "trust_remote_code": True})
    assert spec.trust_remote_code and spec.to_dict()["trust_remote_code"] is True
    assert ModelSpec.from_dict({"name": "m", "source": "/m"}).trust_remote_code is False
    with pytest.raises(ValidationError, match="trust_remote_code"):
        ModelSpec.from_dict({"name": "m", "source": "/m", "trust_remote_code": "yes"})
    engine = EngineSpec.from_dict({"instance": "m", "model": "m", "source": "/m", "port": 18000,
                                   "trust_remote_code": True})
    argv, _ = vllm_command(engine, EngineConfig(), cpu=True)
    assert argv.count("--trust-remote-code") == 1
    argv, _ = vllm_command(EngineSpec.from_dict({**engine.to_dict(), "trust_remote_code": False}), EngineConfig(),
                           cpu=True)
    assert "--trust-remote-code" not in argv


@pytest.mark.parametrize(("body", "allow", "param", "named"), [
    ({"engine_args": ["--middleware", "evil:app"]}, False, "engine_args", "'--middleware' cannot"),
    ({"engine_args": ["--host=0.0.0.0"]}, False, "engine_args", "'--host'"),
    ({"engine_args": ["--speculative-config", "{}"]}, False, "engine_args", "allowed_engine_args"),
    ({"trust_remote_code": True}, False, "trust_remote_code", "allow_trust_remote_code"),
])
async def test_admin_api_refuses_with_400_naming_the_flag_and_the_config_key(
        body: dict[str, Any], allow: bool, param: str, named: str) -> None:
    store = MemoryStore()
    server = GatewayServer(build_gateway_app(GatewayConfig(load_poll_s=0), store, CollectorRegistry(),
                                             engine=EngineConfig(allow_trust_remote_code=allow)))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.make_url("/v1/admin/models"),
                                 json={"name": "m", "source": "/models/m", **body}) as resp:
                status, answer = resp.status, await resp.json()
            assert status == 400 and answer["error"]["param"] == param and named in answer["error"]["message"]
            assert await store.get(keys.model_key("m")) is None
            ok = {"name": "ok", "source": "/models/ok", "engine_args": ["--dtype", "float16"]}
            async with http.post(server.make_url("/v1/admin/models"), json=ok) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        await server.close()


async def test_the_agent_refuses_a_placement_with_a_disallowed_flag(tmp_path: Path) -> None:
    store = MemoryStore()
    node = NodeRecord(name="n1", address="127.0.0.1", port_min=18000, port_max=18010)
    agent = NodeAgent(NebulaConfig(), node, store, TableUnits(), SpecFiles(str(tmp_path / "run")),
                      _never_healthy, CollectorRegistry(), clock=lambda: 1000.0)
    await agent.on_new_lease(await store.grant_lease(10))
    for name, args in (("bad", ("--host", "0.0.0.0")), ("good", ("--dtype", "float16"))):
        model = ModelSpec(name=name, source=model_dir(tmp_path), engine_args=args)
        p = Placement(instance=name, node="n1", model=model, port=18000)
        await store.put(keys.placement_key("n1", name), dumps(p.to_dict()))
    agent.on_placements(mirrored(records.PLACEMENTS, await listing(store, keys.node_placements_prefix("n1"))))
    specs, blocked = agent.desired()
    assert set(specs) == {"good"} and "'--host'" in blocked["bad"]


async def _never_healthy(_: str) -> bool:
    return False


def test_the_engine_refuses_a_spec_file_with_a_disallowed_flag(tmp_path: Path) -> None:
    # The spec file may have been written by anything: the engine checks it again before vLLM starts.
    (tmp_path / "engines").mkdir()
    (tmp_path / "model").mkdir()
    spec = {"instance": "m", "model": "m", "source": str(tmp_path / "model"), "port": 18000,
            "engine_args": ["--middleware", "evil:app"]}
    (tmp_path / "engines" / "m.json").write_text(json.dumps(spec))
    cfg = NebulaConfig(node=NodeConfig(run_dir=str(tmp_path)),
                       engine=EngineConfig(vllm_venv=str(tmp_path / "no-venv"), hand_specs_dir=str(tmp_path)))
    assert run_engine("m", cfg, {}) == ExitCode.BAD_SPEC
    (tmp_path / "engines" / "m.json").write_text(json.dumps({**spec, "engine_args": [],
                                                                "trust_remote_code": True}))
    assert run_engine("m", cfg, {}) == ExitCode.BAD_SPEC
