"""wasmesh.testing: test Proxy-Wasm plugins of any language from pytest.

``PluginHarness`` (the real runtime + filter manager, no sockets) is imported
lazily so that ``wasmesh.testing.envoy``/``upstream`` stay usable without loading
the Wasm runtime. See docs/testing-plugins.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wasmesh.testing.harness import (
        Exchange,
        HarnessError,
        HarnessResponse,
        HttpCall,
        LogRecord,
        ManualScheduler,
        Plugin,
        PluginHarness,
        Upstream,
        UpstreamRequest,
    )

__all__ = [
    "Exchange",
    "HarnessError",
    "HarnessResponse",
    "HttpCall",
    "LogRecord",
    "ManualScheduler",
    "Plugin",
    "PluginHarness",
    "Upstream",
    "UpstreamRequest",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("wasmesh.testing.harness"), name)
    raise AttributeError(f"module 'wasmesh.testing' has no attribute {name!r}")
