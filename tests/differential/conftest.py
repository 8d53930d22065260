"""Fixtures of the Envoy differential suite (helpers live in differential_support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from differential_support import upstream_reply

from wasmesh.testing.upstream import RecordingUpstream


@pytest.fixture(scope="module")
def recording_upstream() -> Iterator[RecordingUpstream]:
    """The upstream behind Envoy's `upstream` cluster (and the probe's http_call cluster)."""
    with RecordingUpstream(upstream_reply) as upstream:
        yield upstream
