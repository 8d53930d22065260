"""Fixtures of the agent tests: real registries (no auth / Basic / token), image pushes, a fault proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from agent_testsupport import (
    FaultProxy,
    ImageSpec,
    ModuleServer,
    Registry,
    real_plugin_wasm,
    skopeo_push,
    start_registry,
    write_oci_index_layout,
    write_oci_layout,
)
from real_parts import require_binary

# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def registry_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Registry]]:
    for binary in ("docker-registry", "skopeo", "htpasswd", "openssl"):
        require_binary(binary)
    started: dict[str, Registry] = {}

    def get(auth: str) -> Registry:
        if auth not in started:
            started[auth] = start_registry(tmp_path_factory.mktemp(f"registry-{auth}"), auth)
        return started[auth]

    yield get
    for registry in started.values():
        registry.stop()


@pytest.fixture(scope="session")
def plain_registry(registry_factory: Callable[[str], Registry]) -> Registry:
    return registry_factory("none")


@pytest.fixture(scope="session")
def other_loopback_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP registry on 127.0.0.2: loopback, but not a name that gets plain HTTP by itself."""
    for binary in ("docker-registry", "skopeo"):
        require_binary(binary)
    registry = start_registry(tmp_path_factory.mktemp("registry-127.0.0.2"), "none", address="127.0.0.2")
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def plugin_wasm() -> bytes:
    return real_plugin_wasm()


@pytest.fixture(scope="session")
def push_image(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """push_image(registry, repository, tag, spec, skopeo_args=()) -> manifest digest as pushed.

    ``spec`` may also be a list of ``(ImageSpec, platform)``: an image index is pushed, and the
    index digest is returned.
    """
    counter = iter(range(1_000_000))

    def push(
        registry: Registry,
        repository: str,
        tag: str,
        spec: ImageSpec | list[tuple[ImageSpec, dict[str, str]]],
        skopeo_args: tuple[str, ...] = (),
    ) -> str:
        layout = tmp_path_factory.mktemp(f"layout-{next(counter)}")
        if isinstance(spec, list):
            digest, _ = write_oci_index_layout(layout, spec, tag)
            skopeo_args = ("--multi-arch", "all", *skopeo_args)
        else:
            digest = write_oci_layout(layout, spec, tag)
        skopeo_push(layout, tag, registry, repository, extra=skopeo_args)
        return digest

    return push


@pytest.fixture
def fault_proxy(plain_registry: Registry) -> Iterator[FaultProxy]:
    proxy = FaultProxy(plain_registry)
    yield proxy
    proxy.stop()


@pytest.fixture
def module_server() -> Iterator[ModuleServer]:
    server = ModuleServer()
    yield server
    server.stop()
