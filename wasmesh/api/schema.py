"""The WasmPlugin CRD schema (structural OpenAPI + CEL rules) and a checker for it.

This reproduces what the Kubernetes apiserver enforces for
``wasmplugins.extensions.istio.io`` (istio/api
``kubernetes/customresourcedefinitions.gen.yaml``) on the raw JSON body, with the
apiserver's message shapes (``Required value``, ``Unsupported value: ...``,
``... in body should match '...'``, ``Invalid value: "object": <CEL message>``).

Deliberate differences, documented in docs/wasmplugin.md:
- enum fields also accept the enum's *number* (protobuf JSON does; the CRD's
  ``type: string`` would not);
- unknown fields are rejected (kubectl's default ``--validate=strict``) rather
  than silently pruned.

Each issue says whether it is *structural* (wrong type, unknown field, unknown
enum value): a body with structural issues cannot be turned into the typed
model, while other issues (lengths, patterns, CEL rules) leave a usable model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from wasmesh.api import model
from wasmesh.api.gourl import go_quote, is_url, parse_request_uri

# A CEL-style rule: returns the rule's message when the value violates it.
Rule = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class SchemaIssue:
    path: str
    message: str
    structural: bool = False


def k8s_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _go_value(value: object) -> str:
    """How the apiserver prints an invalid value: strings quoted, numbers bare."""
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _type_issue(path: str, value: object, want: str) -> SchemaIssue:
    got = k8s_type_name(value)
    return SchemaIssue(path, f'Invalid value: "{got}": {path} in body must be of type {want}: "{got}"', True)


class Node:
    nullable: bool = False

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class AnyNode(Node):
    """Fields the model ignores (e.g. metadata.uid, status): any JSON accepted."""

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        return


@dataclass(frozen=True)
class StringNode(Node):
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    rules: tuple[Rule, ...] = ()
    # Format checks the model needs to succeed (e.g. a timestamp it must parse).
    format_check: Callable[[str], str | None] | None = None
    nullable: bool = False

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        if not isinstance(value, str):
            out.append(_type_issue(path, value, "string"))
            return
        if self.format_check is not None:
            problem = self.format_check(value)
            if problem is not None:
                out.append(SchemaIssue(path, f"Invalid value: {go_quote(value)}: {problem}", True))
        length = len(value)
        if self.min_length is not None and length < self.min_length:
            out.append(
                SchemaIssue(
                    path,
                    f"Invalid value: {go_quote(value)}: "
                    f"{path} in body should be at least {self.min_length} chars long",
                )
            )
        if self.max_length is not None and length > self.max_length:
            out.append(SchemaIssue(path, f"Too long: may not be more than {self.max_length} bytes"))
        if self.pattern is not None and re.search(self.pattern, value) is None:
            out.append(
                SchemaIssue(
                    path, f"Invalid value: {go_quote(value)}: {path} in body should match '{self.pattern}'"
                )
            )
        for rule in self.rules:
            message = rule(value)
            if message is not None:
                out.append(SchemaIssue(path, f'Invalid value: "string": {message}'))


@dataclass(frozen=True)
class IntegerNode(Node):
    minimum: int | None = None
    maximum: int | None = None
    int32: bool = False
    nullable: bool = False

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            out.append(_type_issue(path, value, "integer"))
            return
        if self.int32 and not model.MIN_INT32 <= value <= model.MAX_INT32:
            out.append(
                SchemaIssue(path, f"Invalid value: {value}: {path} in body must be a 32-bit integer", True)
            )
        if self.minimum is not None and value < self.minimum:
            out.append(
                SchemaIssue(
                    path,
                    f"Invalid value: {value}: "
                    f"{path} in body should be greater than or equal to {self.minimum}",
                )
            )
        if self.maximum is not None and value > self.maximum:
            out.append(
                SchemaIssue(
                    path,
                    f"Invalid value: {value}: {path} in body should be less than or equal to {self.maximum}",
                )
            )


@dataclass(frozen=True)
class EnumNode(Node):
    enum: type[IntEnum]
    # The names the CRD lists (valueFrom's CRD enum, for instance, is INLINE/HOST).
    names: tuple[str, ...]

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        supported = ", ".join(f'"{name}"' for name in self.names)
        if isinstance(value, str):
            if value not in self.names:
                out.append(
                    SchemaIssue(
                        path, f"Unsupported value: {go_quote(value)}: supported values: {supported}", True
                    )
                )
            return
        if isinstance(value, int) and not isinstance(value, bool):
            # protobuf JSON accepts an enum's number; wasmesh accepts the known numbers.
            if value not in {member.value for member in self.enum}:
                out.append(
                    SchemaIssue(path, f"Unsupported value: {value}: supported values: {supported}", True)
                )
            return
        out.append(_type_issue(path, value, "string"))


def enum_member(enum: type[IntEnum], value: object) -> IntEnum:
    """The member named or numbered by a (checked) enum field value."""
    if isinstance(value, str):
        return enum[value]
    if isinstance(value, int):
        return enum(value)
    raise TypeError(f"not an enum value: {value!r}")


def enum_name(enum: type[IntEnum], value: object) -> str:
    return enum_member(enum, value).name


def _is_json(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_json(item) for key, item in value.items())
    return False


@dataclass(frozen=True)
class JsonObjectNode(Node):
    """``type: object`` with ``x-kubernetes-preserve-unknown-fields`` (pluginConfig)."""

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        if not isinstance(value, dict):
            out.append(_type_issue(path, value, "object"))
            return
        if not _is_json(value):
            out.append(
                SchemaIssue(
                    path, 'Invalid value: "object": must be plain JSON (string keys, finite numbers)', True
                )
            )


@dataclass(frozen=True)
class MapNode(Node):
    """``type: object`` with ``additionalProperties`` (selector.matchLabels)."""

    values: Node
    max_properties: int | None = None
    rules: tuple[Rule, ...] = ()

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        if not isinstance(value, dict):
            out.append(_type_issue(path, value, "object"))
            return
        if self.max_properties is not None and len(value) > self.max_properties:
            out.append(
                SchemaIssue(path, f"Too many: {len(value)}: must have at most {self.max_properties} items")
            )
        for key, item in value.items():
            if not isinstance(key, str):
                out.append(
                    SchemaIssue(path, f"Invalid value: {_go_value(key)}: map keys must be strings", True)
                )
                continue
            self.values.check(item, f"{path}[{key}]", out)
        for rule in self.rules:
            message = rule(value)
            if message is not None:
                out.append(SchemaIssue(path, f'Invalid value: "object": {message}'))


@dataclass(frozen=True)
class ArrayNode(Node):
    items: Node
    max_items: int | None = None
    # x-kubernetes-list-type: map with this key: item keys must be unique.
    list_map_key: str | None = None

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        if not isinstance(value, list):
            out.append(_type_issue(path, value, "array"))
            return
        if self.max_items is not None and len(value) > self.max_items:
            out.append(SchemaIssue(path, f"Too many: {len(value)}: must have at most {self.max_items} items"))
        seen: set[object] = set()
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            self.items.check(item, item_path, out)
            if self.list_map_key is not None and isinstance(item, dict):
                key = item.get(self.list_map_key)
                if isinstance(key, (str, int)) and key in seen:
                    shown = f'map[string]interface {{}}{{"{self.list_map_key}":{_go_value(key)}}}'
                    out.append(SchemaIssue(item_path, f"Duplicate value: {shown}"))
                if isinstance(key, (str, int)):
                    seen.add(key)


@dataclass(frozen=True)
class ObjectNode(Node):
    properties: Mapping[str, Node]
    required: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    nullable: bool = False
    # Extra detail for "Required value" per field.
    required_messages: Mapping[str, str] = field(default_factory=dict)

    def check(self, value: object, path: str, out: list[SchemaIssue]) -> None:
        if not isinstance(value, dict):
            out.append(_type_issue(path, value, "object"))
            return
        for name in self.required:
            if name not in value:
                detail = self.required_messages.get(name, "")
                out.append(
                    SchemaIssue(_join(path, name), "Required value" + (f": {detail}" if detail else ""))
                )
        for name, item in value.items():
            if not isinstance(name, str):
                out.append(
                    SchemaIssue(path, f"Invalid value: {_go_value(name)}: field names must be strings", True)
                )
                continue
            child_path = _join(path, name)
            node = self.properties.get(name)
            if node is None:
                out.append(SchemaIssue(child_path, _unknown_field_message(name, self.properties), True))
                continue
            if item is None and node.nullable:
                continue
            node.check(item, child_path, out)
        for rule in self.rules:
            message = rule(value)
            if message is not None:
                out.append(SchemaIssue(path, f'Invalid value: "object": {message}'))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _unknown_field_message(name: str, known: Sequence[str] | Mapping[str, Node]) -> str:
    message = f'unknown field "{name}"'
    camel = _camel_case(name)
    if camel != name and camel in known:
        return f'{message} (did you mean "{camel}"? Kubernetes uses the JSON names)'
    lowered = {key.lower(): key for key in known}
    if name.lower() in lowered and lowered[name.lower()] != name:
        return f'{message} (did you mean "{lowered[name.lower()]}"? field names are case-sensitive)'
    return message


# --- CEL rules of the CRD -----------------------------------------------------------------------

_URL_SCHEMES = ("", "http", "https", "oci", "file")


def _url_scheme_rule(value: Any) -> str | None:
    # isURL(self) ? url(self).getScheme() in [...]
    #             : (isURL('http://'+self) && url('http://'+self).getScheme() in [...])
    candidate = value if is_url(value) else "http://" + value
    if not is_url(candidate) or parse_request_uri(candidate).scheme not in _URL_SCHEMES:
        return "url must have schema one of [http, https, file, oci]"
    return None


def _one_of_selector_rule(spec: Any) -> str | None:
    present = sum(1 for name in ("selector", "targetRef", "targetRefs") if name in spec)
    return "only one of targetRefs or selector can be set" if present > 1 else None


def _label_key_wildcard_rule(labels: Any) -> str | None:
    return "wildcard not allowed in label key match" if any("*" in str(key) for key in labels) else None


def _label_key_empty_rule(labels: Any) -> str | None:
    return "key must not be empty" if any(str(key) == "" for key in labels) else None


def _label_value_wildcard_rule(value: Any) -> str | None:
    return "wildcard not allowed in label value match" if "*" in value else None


def _cross_namespace_rule(value: Any) -> str | None:
    return "cross namespace referencing is not currently supported" if len(value) != 0 else None


def _env_value_from_rule(env: Any) -> str | None:
    value_from = env.get("valueFrom", "")
    if isinstance(value_from, int) and not isinstance(value_from, bool) and value_from in (0, 1):
        value_from = model.EnvValueSource(value_from).name
    if value_from == "HOST" and "value" in env:
        return "value may only be set when valueFrom is INLINE"
    return None


def _rfc3339_check(value: str) -> str | None:
    try:
        parse_timestamp(value)
    except ValueError:
        return "must be an RFC 3339 date-time, e.g. 2024-01-31T12:00:00Z"
    return None


def parse_timestamp(value: str) -> datetime:
    """RFC 3339 (Kubernetes' metav1.Time); naive times are taken as UTC."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


_POLICY_TARGET_REFERENCE = ObjectNode(
    properties={
        "group": StringNode(
            max_length=253, pattern=r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
        ),
        "kind": StringNode(min_length=1, max_length=63, pattern=r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"),
        "name": StringNode(min_length=1, max_length=253),
        "namespace": StringNode(rules=(_cross_namespace_rule,)),
    },
    required=("kind", "name"),
)


def _enum(enum: type[IntEnum], names: Sequence[str] | None = None) -> EnumNode:
    return EnumNode(
        enum=enum, names=tuple(names) if names is not None else tuple(member.name for member in enum)
    )


SPEC_SCHEMA = ObjectNode(
    properties={
        "selector": ObjectNode(
            properties={
                "matchLabels": MapNode(
                    values=StringNode(max_length=63, rules=(_label_value_wildcard_rule,)),
                    max_properties=4096,
                    rules=(_label_key_wildcard_rule, _label_key_empty_rule),
                )
            }
        ),
        "targetRef": _POLICY_TARGET_REFERENCE,
        "targetRefs": ArrayNode(items=_POLICY_TARGET_REFERENCE, max_items=16),
        "url": StringNode(min_length=1, rules=(_url_scheme_rule,)),
        "sha256": StringNode(pattern=r"(^$|^[a-f0-9]{64}$)"),
        "imagePullPolicy": _enum(model.PullPolicy),
        "imagePullSecret": StringNode(min_length=1, max_length=253),
        "verificationKey": StringNode(),
        "pluginConfig": JsonObjectNode(),
        "pluginName": StringNode(min_length=1, max_length=256),
        "phase": _enum(model.PluginPhase),
        "priority": IntegerNode(int32=True, nullable=True),
        "failStrategy": _enum(model.FailStrategy),
        "vmConfig": ObjectNode(
            properties={
                "env": ArrayNode(
                    items=ObjectNode(
                        properties={
                            "name": StringNode(min_length=1, max_length=256),
                            "value": StringNode(max_length=2048),
                            "valueFrom": _enum(model.EnvValueSource),
                        },
                        required=("name",),
                        rules=(_env_value_from_rule,),
                    ),
                    max_items=256,
                    list_map_key="name",
                )
            }
        ),
        "match": ArrayNode(
            items=ObjectNode(
                properties={
                    "mode": _enum(model.WorkloadMode),
                    "ports": ArrayNode(
                        items=ObjectNode(
                            properties={"number": IntegerNode(minimum=1, maximum=65535)}, required=("number",)
                        ),
                        list_map_key="number",
                    ),
                }
            )
        ),
        "type": _enum(model.PluginType),
    },
    required=("url",),
    rules=(_one_of_selector_rule,),
)

_STRING_MAP = MapNode(values=StringNode())

METADATA_SCHEMA = ObjectNode(
    properties={
        "name": StringNode(),
        "generateName": StringNode(),
        "namespace": StringNode(),
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "creationTimestamp": StringNode(format_check=_rfc3339_check, nullable=True),
        "resourceVersion": StringNode(),
        "generation": IntegerNode(),
        # ObjectMeta fields the model does not keep.
        "selfLink": AnyNode(),
        "uid": AnyNode(),
        "deletionTimestamp": AnyNode(),
        "deletionGracePeriodSeconds": AnyNode(),
        "ownerReferences": AnyNode(),
        "finalizers": AnyNode(),
        "managedFields": AnyNode(),
    },
)

WASMPLUGIN_SCHEMA = ObjectNode(
    properties={
        "apiVersion": StringNode(),
        "kind": StringNode(),
        "metadata": METADATA_SCHEMA,
        "spec": SPEC_SCHEMA,
        "status": AnyNode(),
    },
    required=("spec",),
)


def check_wasmplugin_body(body: Mapping[str, Any]) -> list[SchemaIssue]:
    """Every CRD-schema issue of a WasmPlugin document body, in document order."""
    issues: list[SchemaIssue] = []
    WASMPLUGIN_SCHEMA.check(dict(body), "", issues)
    return issues
