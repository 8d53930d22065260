"""Fixtures for wasmesh's own test plugins: build them once per session (the script skips up-to-date
outputs, so this is fast when nothing changed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO / "tests" / "plugins" / "build"


@pytest.fixture(scope="session")
def built_plugins() -> Path:
    result = subprocess.run(
        [str(REPO / "scripts" / "build-test-plugins.sh")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/build-test-plugins.sh failed: {result.stderr.strip()}")
    return BUILD_DIR
