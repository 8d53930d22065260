"""Fixtures for the WasmPlugin API tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from wasmplugin_api_helpers import spec_document

from wasmesh.api.validation import ValidationResult, validate_document


@pytest.fixture
def validate_spec() -> Callable[[str], ValidationResult]:
    def run(spec_yaml: str) -> ValidationResult:
        return validate_document(spec_document(spec_yaml))

    return run
