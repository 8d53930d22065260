"""Reading Kubernetes-style documents from YAML/JSON files and directories.

This is transport only: it turns files into ``Document`` records (kind,
apiVersion, body, where it came from) and knows nothing about WasmPlugin. The
YAML dialect follows what ``kubectl`` accepts: multi-document streams separated
by ``---``, empty documents skipped, and unquoted timestamps kept as strings (the
apiserver sees JSON, where a timestamp is a string).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DOCUMENT_SUFFIXES = (".yaml", ".yml", ".json")
STDIN_PATH = Path("-")


class LoadError(ValueError):
    """A file could not be read or parsed; the message is one line naming the file."""


@dataclass(frozen=True)
class Document:
    kind: str
    apiVersion: str  # noqa: N815 - the Kubernetes field name, as the brief's contract spells it
    body: Mapping[str, Any]
    source_file: Path
    # 1-based position of the document in its file's YAML stream (empty documents count).
    doc_index: int
    # 1-based line where the document starts (0 when unknown).
    line: int = 0

    @property
    def api_version(self) -> str:
        return self.apiVersion

    @property
    def name(self) -> str:
        metadata = self.body.get("metadata")
        if isinstance(metadata, Mapping):
            name = metadata.get("name")
            if isinstance(name, str):
                return name
        return ""

    @property
    def namespace(self) -> str:
        metadata = self.body.get("metadata")
        if isinstance(metadata, Mapping):
            namespace = metadata.get("namespace")
            if isinstance(namespace, str) and namespace:
                return namespace
        return "default"

    @property
    def location(self) -> str:
        """``<file>: document <n>``, the prefix of every message about this document."""
        return f"{self.source_file}: document {self.doc_index}"


@dataclass
class LoadResult:
    documents: list[Document] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class _KubernetesYamlLoader(yaml.SafeLoader):
    """SafeLoader without the timestamp resolver: JSON (what the apiserver sees) has no timestamps."""


_KubernetesYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def expand_paths(paths: Iterable[Path | str]) -> tuple[list[Path], list[str]]:
    """Files named directly, plus the *.yaml/*.yml/*.json files of named directories.

    Directory entries are sorted by name and not searched recursively (like ``kubectl -f DIR``).
    """
    files: list[Path] = []
    errors: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path == STDIN_PATH:
            files.append(path)
        elif path.is_dir():
            files.extend(
                sorted(
                    child for child in path.iterdir() if child.is_file() and child.suffix in DOCUMENT_SUFFIXES
                )
            )
        elif path.is_file():
            files.append(path)
        elif path.exists():
            errors.append(f"{path}: not a regular file or directory")
        else:
            errors.append(f"{path}: no such file or directory")
    return files, errors


def _yaml_error_line(source: Path, exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        if mark is not None:
            return f"{source}: line {mark.line + 1} column {mark.column + 1}: YAML syntax error: {problem}"
        return f"{source}: YAML syntax error: {problem}"
    return f"{source}: YAML syntax error: {' '.join(str(exc).split())}"


def _document(source: Path, index: int, line: int, data: object) -> Document:
    if not isinstance(data, dict):
        type_name = type(data).__name__
        raise LoadError(
            f"{source}: document {index}: line {line}: "
            f"expected a mapping with apiVersion and kind, got {type_name}"
        )
    kind = data.get("kind", "")
    api_version = data.get("apiVersion", "")
    if not isinstance(kind, str) or not isinstance(api_version, str):
        raise LoadError(f"{source}: document {index}: line {line}: apiVersion and kind must be strings")
    return Document(
        kind=kind, apiVersion=api_version, body=data, source_file=source, doc_index=index, line=line
    )


def parse_yaml_stream(text: str, source: Path) -> list[Document]:
    """All non-empty documents of a YAML stream. Raises LoadError (one line) on bad YAML."""
    documents: list[Document] = []
    try:  # the reader checks the text as the loader is made: a non-printable character fails here
        loader = _KubernetesYamlLoader(text)
    except yaml.YAMLError as exc:
        raise LoadError(_yaml_error_line(source, exc)) from None
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            index += 1
            if node is None:
                continue
            line = node.start_mark.line + 1
            data = loader.construct_document(node)
            if data is None:  # an empty document, e.g. between two `---`
                continue
            documents.append(_document(source, index, line, data))
    except yaml.YAMLError as exc:
        raise LoadError(_yaml_error_line(source, exc)) from None
    finally:
        loader.dispose()
    return documents


def parse_json_document(text: str, source: Path) -> list[Document]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoadError(
            f"{source}: line {exc.lineno} column {exc.colno}: JSON syntax error: {exc.msg}"
        ) from None
    if data is None:
        return []
    return [_document(source, 1, 1, data)]


def _read_text(path: Path) -> str:
    if path == STDIN_PATH:
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LoadError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise LoadError(f"{path}: {exc.strerror or exc}") from None


def load_file(path: Path) -> list[Document]:
    """The documents of one file (JSON for *.json, YAML otherwise). Raises LoadError."""
    text = _read_text(path)
    if path.suffix == ".json":
        return parse_json_document(text, path)
    return parse_yaml_stream(text, path)


def load_all(paths: Iterable[Path | str]) -> LoadResult:
    """Like ``load_documents`` but collects one error line per bad path/file instead of raising."""
    files, errors = expand_paths(paths)
    result = LoadResult(errors=errors)
    for path in files:
        try:
            result.documents.extend(load_file(path))
        except LoadError as exc:
            result.errors.append(str(exc))
    return result


def load_documents(paths: Iterable[Path | str]) -> list[Document]:
    """Every document in the given files/directories, in order. Raises LoadError on the first problem."""
    result = load_all(paths)
    if result.errors:
        raise LoadError(result.errors[0])
    return result.documents
