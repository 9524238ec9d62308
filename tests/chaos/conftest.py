"""The chaos suite's one cluster (kept for every fault) and its table of figures at the end of the run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nebula.core.apikeys import digest
from nebula.services.gateway.keys_api import new_token
from tests.chaos import probes
from tests.chaos.load import LoadGenerator
from tests.chaos.report import REPORT, FaultRow, format_table
from tests.chaos.rig import MODEL, REPLICAS, Chaos
from tests.harness.cluster import NebulaCluster, required_path
from tests.harness.etcd import EtcdServer

# Engines on CPU take minutes to start, most of all while the other engine serves the load.
ENGINES_UP_S = 600
# The engines' own watchdog in process mode (engine.watchdog_s); systemd's WatchdogSec= is 30 s. Shorter
# here to keep the suite short: the mechanism is the same.
WATCHDOG_S = 10.0


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    rows = config.stash.get(REPORT, [])
    if not rows:
        return
    terminalreporter.section("chaos suite: one fault at a time under steady load")
    for line in format_table(rows):
        terminalreporter.write_line(line)


# Module scope: the engines stop when the chaos tests end, not at the end of the whole test session.
@pytest.fixture(scope="module")
def chaos(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    """Two nodes, two schedulers, one single-member etcd (grown to three by the suite), model `duo` with a
    replica on each node, and a load generator running through the gateway from the first fault on."""
    venv = required_path("NEBULA_TEST_VLLM_VENV")
    models = Path(required_path("NEBULA_TEST_MODELS"))
    rows = request.config.stash.setdefault(REPORT, [])
    etcd = EtcdServer.launch(tmp_path_factory.mktemp("chaos-etcd"))
    # A closed gateway, as production runs it: an admin key from the config (the package's bootstrap key
    # works the same way), which the load, the probes and the CLI use.
    admin_key = new_token()
    c = NebulaCluster(workdir=tmp_path_factory.mktemp("chaos"), etcd=etcd, vllm_venv=venv,
                      node_grace_s=60.0, extra_nodes=("node-b",), extra_schedulers=1, restart_on_failure=True,
                      node_resync_s=1.0, engine_watchdog_s=WATCHDOG_S,
                      extra_env={"NEBULA_GATEWAY_ADMIN_KEY_HASHES": digest(admin_key), "NEBULA_ADMIN_KEY": admin_key})
    load: LoadGenerator | None = None
    try:
        c.up()
        start = time.monotonic()
        c.cli("load", MODEL, "--source", str(models / "tiny-llama"), "--replicas", str(REPLICAS))
        load = LoadGenerator(c.gateway_url, MODEL, api_key=admin_key)
        ch = Chaos(c, load, rows)
        ch.wait_ready(ENGINES_UP_S)
        rows.append(FaultRow("(start: both engines)", recovery_s=time.monotonic() - start))
        spread = {st["node"] for st in probes.instances(c, MODEL).values()}
        assert spread == set(probes.nodes(c)), f"replicas not spread over both nodes: {spread}"
        load.start()
        yield ch
    finally:
        if load is not None:
            load.stop()
        c.down()
        c.etcd.stop()
