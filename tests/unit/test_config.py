"""Config parsing: defaults, TOML, NEBULA_ overrides, and one-line errors that name file and key."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.core.config import NebulaConfig, parse_config, parse_config_text
from nebula.errors import ConfigError

SRC = "/etc/nebula/nebula.toml"


def test_defaults_are_valid_and_loopback() -> None:
    cfg = parse_config({}, {}, SRC)
    assert cfg == NebulaConfig()
    assert cfg.gateway.host == "127.0.0.1"


def test_toml_values_and_env_override() -> None:
    cfg = parse_config_text('[gateway]\nport = 9000\n[cluster]\netcd_endpoints = ["http://e1:2379"]\n',
                            {"NEBULA_GATEWAY_PORT": "9100", "NEBULA_ENGINE_EXTRA_ARGS": "--a,--b",
                             "NEBULA_GATEWAY_CONNECT_TIMEOUT_S": "0.5"}, SRC)
    assert cfg.gateway.port == 9100
    assert cfg.cluster.etcd_endpoints == ("http://e1:2379",)
    assert cfg.engine.extra_args == ("--a", "--b")
    assert cfg.gateway.connect_timeout_s == 0.5


@pytest.mark.parametrize(("text", "env", "expected"), [
    ('[gateway]\nport = "x"\n', {}, f"{SRC}: gateway.port: must be an integer"),
    ("[gateway]\nport = 70000\n", {}, f"{SRC}: gateway.port: must be a TCP port"),
    ("[gateway]\nprot = 1\n", {}, f"{SRC}: gateway.prot: unknown key"),
    ("[gatway]\n", {}, f"{SRC}: gatway: unknown section"),
    ("[router]\nport = 8001\n", {}, f"{SRC}: router: the router service is retired: routing moved into the gateway"),
    ('[gateway]\nrouter_url = "http://127.0.0.1:8001"\n', {}, f"{SRC}: gateway.router_url: unknown key"),
    ("[gateway]\nmax_attempts = 0\n", {}, f"{SRC}: gateway.max_attempts: must be at least 1"),
    ("[gateway]\nmax_connections = -1\n", {}, f"{SRC}: gateway.max_connections: must be 0 or more"),
    ("", {"NEBULA_GATEWAY_HEADER_TIMEOUT_S": "0"}, f"{SRC}: gateway.header_timeout_s: must be more than 0"),
    ("[gateway\n", {}, f"{SRC}: not valid TOML"),
    ("", {"NEBULA_GATEWAY_PORT": "abc"}, f"{SRC}: NEBULA_GATEWAY_PORT: must be an integer"),
    ('[node]\nunit_backend = "docker"\n', {}, f"{SRC}: node.unit_backend: must be"),
    ('[cluster]\netcd_endpoints = ["e1"]\n', {}, f"{SRC}: cluster.etcd_endpoints[0]: must look like"),
    ("[cluster]\nlease_ttl_s = true\n", {}, f"{SRC}: cluster.lease_ttl_s: must be an integer"),
])
def test_errors_are_one_line_naming_file_and_key(text: str, env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_text(text, env, SRC)
    msg = str(e.value)
    assert msg.startswith(expected), msg
    assert "\n" not in msg


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from(["gateway", "router", "node", "engine", "bogus"]),
                       st.dictionaries(st.sampled_from(["port", "host", "max_attempts", "x"]),
                                       st.one_of(st.integers(), st.text(max_size=5), st.booleans(),
                                                 st.floats(allow_nan=False)), max_size=3), max_size=3))
def test_any_input_parses_or_gives_config_error(data: dict[str, dict[str, object]]) -> None:
    try:
        parse_config(data, {}, SRC)
    except ConfigError as e:
        assert str(e).startswith(SRC)


def test_an_empty_router_table_of_an_older_template_is_ignored() -> None:
    """`config init` of the two-hop design wrote a [router] header with every key commented out."""
    cfg = parse_config_text("[router]\n# port = 8001\n[gateway]\nport = 8100\n", {}, SRC)
    assert cfg.gateway.port == 8100
