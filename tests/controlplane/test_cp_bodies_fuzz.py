"""A bounded, seeded fuzz run of the API's body parsing (wasmesh.controlplane.bodies).

Every input must end in parsed documents or a one-line BodyError (what the API answers 400 with),
never another exception, and each within the deadline. The run is derandomized (the same inputs on
every run) and bounded (300 examples per strategy), so it is a regular, repeatable test.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wasmesh.api.load import Document
from wasmesh.controlplane.bodies import BodyError, parse_documents

FUZZ = settings(
    derandomize=True,
    max_examples=300,
    deadline=5000,  # ms per input: generous for a loaded 2-core machine, far below a hang
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Pieces of YAML and JSON syntax, so random texts reach the parsers' deeper states.
FRAGMENTS = [
    "---\n", "...\n", "apiVersion: extensions.istio.io/v1alpha1\n", "kind: WasmPlugin\n", "kind: List\n",
    "items:\n", "- ", "  ", "metadata:\n", "  name: x\n", "spec:\n", "  url: file:///p.wasm\n", "&a ", "*a",
    "[", "]", "{", "}", ",", ":", "\"", "'", "!!binary ", "!!python/object:os.system ", "<<: *a\n", "? ",
    "|\n", ">-\n", "#", "\t", "\n", "null", "~", "1e309", "0x10", "\\u0000", "\ufeff", "%YAML 1.1\n",
]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=40,
)


def _document_like(value: Any, kind: str) -> dict[str, Any]:
    return {"apiVersion": "extensions.istio.io/v1alpha1", "kind": kind, "metadata": value, "spec": value}


def check(text: str) -> None:
    """Documents, or a one-line BodyError; any other exception fails the example."""
    try:
        documents = parse_documents(text, "request")
    except BodyError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return
    assert documents, "parse_documents returned no documents without raising BodyError"
    assert all(isinstance(document, Document) for document in documents)


@FUZZ
@given(st.text(max_size=400))
@example("kind: \x1f")  # found by this run: PyYAML's Reader raised from its constructor (a 500)
def test_random_text(text: str) -> None:
    check(text)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8), max_size=60))
def test_yaml_and_json_fragments(pieces: list[str]) -> None:
    check("".join(pieces))


@FUZZ
@given(json_values, st.sampled_from(["WasmPlugin", "List", "Secret", "Workload"]), st.booleans())
def test_structured_documents(value: Any, kind: str, as_json: bool) -> None:
    document: Any = _document_like(value, kind)
    if kind == "List":
        document["items"] = value
    check(json.dumps(document) if as_json else yaml.safe_dump(document))


@FUZZ
@given(st.integers(min_value=1, max_value=400), st.sampled_from(["[", '{"a": ', "- ", "a:\n  "]))
def test_deep_nesting(depth: int, opener: str) -> None:
    check(opener * depth)
