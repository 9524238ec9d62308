"""The data-plane server of tests/harness/fastserver.py as the fixture `served`, shared by the
test_fastserver_*.py files. A test module imports it by its function name, `served_fixture  # noqa: F401` (the
name= keeps a test's argument from shadowing the import)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.harness.fastserver import Served, serving


@pytest.fixture(name="served")
async def served_fixture() -> AsyncIterator[Served]:
    async with serving() as s:
        yield s
