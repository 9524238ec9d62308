"""Shared fixtures for integration tests. Each section belongs to one component; append new ones below."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.etcd import EtcdServer

# --- etcd -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the session; tests isolate themselves by key prefix and must leave it running."""
    server = EtcdServer.launch(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.stop()


# --- fixtures kept in modules of their own: the systemd sandbox, and the cluster serving chat (with tools),
# embed and rerank models that the API tests share ------------------------------------------------------
from tests.integration.api_fixtures import api_cluster  # noqa: E402, F401
from tests.integration.systemd_fixtures import systemd_sandbox  # noqa: E402, F401
