"""The `systemd_sandbox` fixture: one real systemd per test session (import it from conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.systemd import REPO_ROOT, SystemdSandbox, up


@pytest.fixture(scope="session")
def systemd_sandbox() -> Iterator[SystemdSandbox]:
    """Binds the repository (its .venv included) so units run this checkout's code; `.scratch` is shared."""
    sandbox = up([REPO_ROOT])
    try:
        yield sandbox
    finally:
        sandbox.down()
