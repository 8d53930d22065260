"""Helpers for the WasmPlugin API tests: build documents from YAML text without touching disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from wasmesh.api.load import Document, parse_yaml_stream
from wasmesh.api.validation import ValidationResult, validate_document

DATA_DIR = Path(__file__).parent / "data"

HEADER = """apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: test
spec:
"""


def spec_document(spec_yaml: str, source: str = "test.yaml") -> Document:
    """A WasmPlugin document named default/test whose spec is the given (unindented) YAML."""
    indented = "".join(f"  {line}\n" for line in spec_yaml.strip("\n").splitlines())
    (document,) = parse_yaml_stream(HEADER + indented, Path(source))
    return document


@pytest.fixture
def validate_spec() -> Callable[[str], ValidationResult]:
    def run(spec_yaml: str) -> ValidationResult:
        return validate_document(spec_document(spec_yaml))

    return run
