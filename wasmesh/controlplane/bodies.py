"""Request bodies of the control plane API → documents, refusing what would hurt the server.

A body is a YAML stream or JSON (an object, or a `kind: List` with `items`). Bad input raises
`BodyError` with one line naming what is wrong:

- syntax errors (the `wasmesh.api.load` messages, with line and column);
- a body holding no documents, or a List whose items are not objects;
- nesting deeper than `MAX_DEPTH` levels (the store, validation and JSON encoding recurse);
- YAML aliases that expand to far more nodes than the text holds (a "billion laughs" bomb). The
  Kubernetes API server refuses these too (go-yaml's "document contains excessive aliasing"); the
  check runs on the composed node graph, where an alias is one shared node, so it costs time
  proportional to the text and never expands anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import yaml

from wasmesh.api.load import Document, LoadError, parse_json_document, parse_yaml_stream

MAX_DEPTH = 100
# Aliases may reuse nodes, but a document's expansion may not exceed this many nodes unless the
# text itself is that large (then it may reach ALIAS_EXPANSION_RATIO times its own node count).
MAX_EXPANDED_NODES = 10_000
ALIAS_EXPANSION_RATIO = 10


class BodyError(ValueError):
    """The request body cannot be turned into documents; the message is one line."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def check_yaml_node(node: yaml.Node, where: str) -> None:
    """Refuse a composed document nested deeper than MAX_DEPTH or whose aliases expand too far."""
    distinct: set[int] = set()
    expanded_size: dict[int, int] = {}
    # Iterative post-order walk; an aliased node is visited (and sized) once.
    stack: list[tuple[yaml.Node, int, bool]] = [(node, 1, False)]
    on_path: set[int] = set()
    while stack:
        current, depth, children_done = stack.pop()
        key = id(current)
        if children_done:
            on_path.discard(key)
            expanded_size[key] = 1 + sum(expanded_size[id(child)] for child in _children(current))
            continue
        if depth > MAX_DEPTH:
            raise BodyError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if key in expanded_size:
            continue
        if key in on_path:  # a recursive alias (PyYAML allows `&a [*a]`)
            raise BodyError(f"{where}: YAML alias refers to itself")
        distinct.add(key)
        on_path.add(key)
        stack.append((current, depth, True))
        for child in _children(current):
            if id(child) not in expanded_size:
                stack.append((child, depth + 1, False))
    total = expanded_size[id(node)]
    if total > max(MAX_EXPANDED_NODES, ALIAS_EXPANSION_RATIO * len(distinct)):
        raise BodyError(
            f"{where}: YAML aliases expand {len(distinct)} nodes to {total} "
            "(document contains excessive aliasing)"
        )


def _json_depth_ok(value: object, where: str) -> None:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BodyError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(current, dict):
            stack.extend((child, depth + 1) for child in current.values())
        elif isinstance(current, list):
            stack.extend((child, depth + 1) for child in current)


def _yaml_documents_checked(text: str, source: str) -> None:
    """Compose (never construct) every document and check it; syntax errors are left to the loader."""
    try:  # the Reader refuses non-printable characters in its constructor, before any parsing
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        character = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        raise BodyError(
            f"{source}: character {exc.position + 1}: YAML syntax error: unacceptable character "
            f"#x{character:04x} (special characters are not allowed)"
        ) from None
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            index += 1
            if node is not None:
                check_yaml_node(node, f"{source}: document {index}: line {node.start_mark.line + 1}")
    except yaml.YAMLError:
        return  # parse_yaml_stream reports it with line and column
    except RecursionError:
        raise BodyError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def _list_items(document: Document, path: Path) -> Iterator[Document]:
    items = document.body.get("items")
    if items is None:
        return
    if not isinstance(items, list):
        raise BodyError(f"{document.location}: List items: expected a list, got {type(items).__name__}")
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise BodyError(
                f"{document.location}: List items[{position}]: expected an object with apiVersion and kind, "
                f"got {'null' if item is None else type(item).__name__}"
            )
        try:
            yield parse_json_document(json.dumps(item), path)[0]
        except LoadError as exc:
            raise BodyError(f"{document.location}: List items[{position}]: {exc}") from None


def parse_documents(text: str, source: str) -> list[Document]:
    """YAML stream or JSON (object, or a List with items) → documents. Raises BodyError."""
    path = Path(source)
    stripped = text.lstrip()
    try:
        if stripped.startswith(("{", "[")):
            try:
                _json_depth_ok(json.loads(text), source)
            except json.JSONDecodeError:
                pass  # parse_json_document reports it with line and column
            documents = parse_json_document(text, path)
        else:
            _yaml_documents_checked(text, source)
            documents = parse_yaml_stream(text, path)
    except LoadError as exc:
        raise BodyError(str(exc)) from None
    except RecursionError:
        raise BodyError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    expanded: list[Document] = []
    for document in documents:
        if document.kind == "List":
            expanded.extend(_list_items(document, path))
        else:
            expanded.append(document)
    if not expanded:
        raise BodyError(f"{source}: no objects passed (the body holds no documents)")
    return expanded
