"""Shared helpers of the WasmPlugin API tests (a uniquely named module: several test dirs have a conftest)."""

from __future__ import annotations

from pathlib import Path

from wasmesh.api.load import Document, parse_yaml_stream

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
