"""Just enough of Go's ``net/url`` parsing to reproduce Istio's URL verdicts.

Istio decides whether a WasmPlugin ``url`` is acceptable with Go's
``url.ParseRequestURI`` (istiod's ``strictParseURL``, and Kubernetes CEL's
``isURL``/``url()`` in the CRD rule). Python's ``urllib`` disagrees with Go on
several inputs that matter here (``localhost:5000/x`` has the scheme
``localhost`` in Go), so the relevant parts of Go's algorithm are reproduced:
scheme detection, request-URI shape, authority (userinfo/host/port) and
percent-escape checks. Error texts follow Go's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_HEX = "0123456789abcdefABCDEF"
# Bytes Go allows unescaped in a host (besides alphanumerics): shouldEscape(c, encodeHost) == false.
_HOST_SAFE = set("-_.~!$&'()*+,;=:[]<>\"")
_USERINFO_SAFE = set("-._:~!$&'()*+,;=%@")


class GoURLError(ValueError):
    """Go's ``*url.Error``: ``parse "<url>": <reason>``."""


@dataclass(frozen=True)
class ParsedRequestURI:
    scheme: str
    host: str
    path: str


def go_quote(text: str) -> str:
    """Go's ``%q`` for ordinary strings (double quotes, backslash escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _fail(raw: str, reason: str) -> GoURLError:
    return GoURLError(f"parse {go_quote(raw)}: {reason}")


def split_scheme(raw: str) -> tuple[str, str]:
    """Go's ``getScheme``: (scheme, rest); scheme is "" when the text has none."""
    for index, char in enumerate(raw):
        if char.isascii() and char.isalpha():
            continue
        if char.isascii() and (char.isdigit() or char in "+-."):
            if index == 0:
                return "", raw
            continue
        if char == ":":
            if index == 0:
                raise ValueError("missing protocol scheme")
            return raw[:index], raw[index + 1 :]
        return "", raw
    return "", raw


def _check_escapes(raw: str, text: str) -> None:
    index = text.find("%")
    while index != -1:
        escape = text[index : index + 3]
        if len(escape) < 3 or escape[1] not in _HEX or escape[2] not in _HEX:
            raise _fail(raw, f"invalid URL escape {go_quote(escape)}")
        index = text.find("%", index + 3)


def _valid_optional_port(port: str) -> bool:
    """Go's ``validOptionalPort``: empty, or ':' followed by ASCII digits only."""
    if port == "":
        return True
    digits = port[1:]
    return port.startswith(":") and all("0" <= char <= "9" for char in digits)


def _check_host(raw: str, host: str) -> None:
    if host.startswith("["):
        end = host.rfind("]")
        if end == -1:
            raise _fail(raw, "missing ']' in host")
        port = host[end + 1 :]
        if not _valid_optional_port(port):
            raise _fail(raw, f"invalid port {go_quote(port)} after host")
        return
    colon = host.rfind(":")
    if colon != -1 and not _valid_optional_port(host[colon:]):
        raise _fail(raw, f"invalid port {go_quote(host[colon:])} after host")
    _check_escapes(raw, host)
    for char in host:
        if char == "%" or not char.isascii() or char.isalnum() or char in _HOST_SAFE:
            continue
        raise _fail(raw, f"invalid character {go_quote(char)} in host name")


def parse_request_uri(raw: str) -> ParsedRequestURI:
    """Go's ``url.ParseRequestURI`` verdict. Raises GoURLError with Go's message."""
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in raw):
        raise _fail(raw, "net/url: invalid control character in URL")
    if raw == "":
        raise _fail(raw, "empty url")
    try:
        scheme, rest = split_scheme(raw)
    except ValueError as exc:
        raise _fail(raw, str(exc)) from None
    scheme = scheme.lower()
    if not (rest.endswith("?") and rest.count("?") == 1):
        rest = rest.split("?", 1)[0]
    if not rest.startswith("/"):
        if scheme:
            return ParsedRequestURI(scheme=scheme, host="", path="")  # an opaque URL such as mailto:x
        raise _fail(raw, "invalid URI for request")
    host = ""
    if scheme and rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        rest = slash + path
        userinfo, at, host = authority.rpartition("@")
        if at and any(
            not (char.isascii() and char.isalnum()) and char not in _USERINFO_SAFE for char in userinfo
        ):
            raise _fail(raw, "net/url: invalid userinfo")
        if not at:
            host = authority
        _check_host(raw, host)
    _check_escapes(raw, rest)
    return ParsedRequestURI(scheme=scheme, host=host, path=rest)


def parse_reference(raw: str) -> None:
    """Go's ``url.Parse`` extra checks over ParseRequestURI: the fragment's escapes."""
    if "#" in raw:
        _check_escapes(raw, raw.split("#", 1)[1])


def is_url(raw: str) -> bool:
    """Kubernetes CEL ``isURL``: ParseRequestURI succeeds."""
    try:
        parse_request_uri(raw)
    except GoURLError:
        return False
    return True
