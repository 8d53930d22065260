"""Fixtures for the runtime tests; the helpers they use live in runtime_support.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_support import LogRecorder, ManualScheduler, RecordingHttpCaller

from wasmesh.runtime import Runtime
from wasmesh.runtime.engine import Crossing

# The whole runtime suite runs against both crossings, the C extension and pure ctypes
# (cpp-host's "one suite against every engine"); "c" fails loudly when it was not built.
CROSSINGS: tuple[Crossing, ...] = ("c", "ctypes")


@pytest.fixture
def logs() -> LogRecorder:
    return LogRecorder()


@pytest.fixture
def scheduler() -> ManualScheduler:
    return ManualScheduler()


@pytest.fixture
def http_caller() -> RecordingHttpCaller:
    return RecordingHttpCaller({"auth"})


@pytest.fixture(params=CROSSINGS)
def crossing(request: pytest.FixtureRequest) -> Crossing:
    value: Crossing = request.param
    return value


@pytest.fixture
def runtime(
    tmp_path: Path,
    logs: LogRecorder,
    scheduler: ManualScheduler,
    http_caller: RecordingHttpCaller,
    crossing: Crossing,
) -> Iterator[Runtime]:
    from wasmesh.runtime import LogLevel

    rt = Runtime(
        crossing=crossing,
        http_caller=http_caller, scheduler=scheduler, log_handler=logs,
        compile_cache_dir=str(tmp_path / "cc"),
        node={"id": "node-1", "cluster": "c1", "metadata": {"ISTIO_VERSION": "1.24"}},
        log_level=LogLevel.TRACE, reload_backoff_s=0.0,
    )
    yield rt
    rt.close()
