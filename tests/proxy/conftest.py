"""Shared fixtures for the proxy tests: one loop thread, echo upstreams, proxies on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_testsupport import EchoServer, LoopThread, StartProxy

from wasmesh.proxy.config import parse_config
from wasmesh.proxy.server import ProxyServer
from wasmesh.proxy.workers import make_server


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture(scope="module")
def echo(loop_thread: LoopThread) -> Iterator[EchoServer]:
    server = EchoServer(loop_thread, "echo-a").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def echo_b(loop_thread: LoopThread) -> Iterator[EchoServer]:
    server = EchoServer(loop_thread, "echo-b").start()
    yield server
    server.stop()


@pytest.fixture
def start_proxy(loop_thread: LoopThread) -> Iterator[StartProxy]:
    started: list[ProxyServer] = []

    def start(raw: dict[str, Any], source: str = "<inline>") -> ProxyServer:
        proxy = make_server(parse_config(raw, source=source, base_dir=Path(source).parent), 0, False)
        loop_thread.run(proxy.start())
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        loop_thread.run(p.stop(drain_timeout_s=1))
