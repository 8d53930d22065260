"""Fixtures of the agent xDS tests (helpers live in agentxds_support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from agentxds_support import ModuleServer


@pytest.fixture(scope="session")
def module_server() -> Iterator[ModuleServer]:
    server = ModuleServer()
    yield server
    server.stop()
