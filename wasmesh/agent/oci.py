"""A small OCI distribution-spec client: references, manifest and blob GETs, and registry auth.

Auth follows the registry's ``WWW-Authenticate`` challenge: Basic (credentials sent as is) or Bearer
(a token from ``realm`` for ``service``/``scope``, read from ``token`` or ``access_token``).

Schemes follow go-containerregistry (Istio's fetcher): HTTPS first, then plain HTTP, for registries the
caller marks insecure and for local ones (:func:`is_local_registry`); every other registry is HTTPS only.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

from wasmesh.agent.credentials import ANONYMOUS, DOCKER_HUB_REGISTRY, RegistryCredential
from wasmesh.agent.errors import FetchError, FetchResult
from wasmesh.agent.httpfetch import backoff_delays, is_retryable_status
from wasmesh.agent.ssrf import AddressPolicy
from wasmesh.agent.transport import HttpResponse, TransportError, http_request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
MAX_MANIFEST_BYTES = 4 << 20  # the distribution spec's suggested manifest limit

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_REPOSITORY_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
# Docker Hub's API is served from this host, not from index.docker.io.
_DOCKER_HUB_API_HOST = "registry-1.docker.io"
_RFC1918_NETWORKS = tuple(
    ipaddress.IPv4Network(block) for block in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
INSECURE_REGISTRY_HINT = "--insecure-registry {host} (or WASM_INSECURE_REGISTRIES)"


def _split_registry_host(registry: str) -> tuple[str, str] | None:
    """(host, port) of ``host[:port]`` or ``[v6][:port]`` (port may be ""); None if malformed."""
    if registry.startswith("["):
        host, bracket, rest = registry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    elif registry.count(":") > 1:  # a bare IPv6 address, as go-containerregistry accepts "::1"
        host, port = registry, ""
    else:
        host, _, port = registry.partition(":")
        if ":" in registry and not port:
            return None
    if port and not port.isdigit():
        return None
    return host, port


def is_local_registry(registry: str) -> bool:
    """Whether ``registry`` gets plain HTTP after HTTPS without being listed insecure.

    go-containerregistry's ``Registry.Scheme()`` (pkg/name/registry.go), as Istio's fetcher uses it:
    ``localhost[:PORT]``, ``*.localhost[:PORT]``, exactly ``127.0.0.1[:PORT]``, ``::1`` / ``[::1]:PORT``,
    and RFC 1918 addresses (10/8, 172.16/12, 192.168/16). Anything else, 127.0.0.2 included, is
    HTTPS only. (go-containerregistry matches "127.0.0.1" and "::1" anywhere in the name; wasmesh
    takes the addresses exactly.)
    """
    parts = _split_registry_host(registry.strip().lower())
    if parts is None:
        return False
    host = parts[0]
    if host in ("localhost", "127.0.0.1", "::1") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return any(address in network for network in _RFC1918_NETWORKS)


class PlainHttpRegistryError(TransportError):
    """A registry that may only be reached over HTTPS answered the TLS handshake in plain HTTP."""

    def __init__(self, url: str, registry: str) -> None:
        hint = INSECURE_REGISTRY_HINT.format(host=registry)
        super().__init__(url, f"registry {registry} speaks plain HTTP; add it with {hint}")


@dataclass(frozen=True)
class ImageReference:
    """``registry/repository[:tag][@sha256:digest]`` parsed as go-containerregistry parses it."""

    registry: str
    repository: str
    tag: str = "latest"
    digest: str = ""

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        original = text
        if text.startswith("oci://"):
            text = text[len("oci://") :]
        if not text:
            raise ValueError("image reference: empty")
        digest = ""
        if "@" in text:
            text, digest = text.split("@", 1)
            if not _DIGEST_RE.match(digest):
                raise ValueError(
                    f"image reference {original!r}: invalid digest {digest!r} (need sha256:<64 hex>)"
                )
        first, slash, rest = text.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, remainder = first.lower(), rest
        else:
            registry, remainder = DOCKER_HUB_REGISTRY, text
        if registry == "docker.io":
            registry = DOCKER_HUB_REGISTRY
        tag = "latest"
        last_slash = remainder.rfind("/")
        colon = remainder.rfind(":")
        if colon > last_slash:
            remainder, tag = remainder[:colon], remainder[colon + 1 :]
            if not _TAG_RE.match(tag):
                raise ValueError(f"image reference {original!r}: invalid tag {tag!r}")
        if registry == DOCKER_HUB_REGISTRY and "/" not in remainder:
            remainder = "library/" + remainder
        if not _REPOSITORY_RE.match(remainder):
            raise ValueError(f"image reference {original!r}: invalid repository {remainder!r}")
        return cls(registry=registry, repository=remainder, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """Registry and repository without tag or digest (go-containerregistry ``Context().Name()``)."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: object, where: str) -> Descriptor:
        if not isinstance(value, dict):
            raise FetchError(f"{where}: expected a descriptor object", FetchResult.MANIFEST_FAILURE)
        media_type, digest, size = value.get("mediaType", ""), value.get("digest"), value.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise FetchError(
                f"{where}.digest: invalid or unsupported digest {digest!r}", FetchResult.MANIFEST_FAILURE
            )
        if not isinstance(size, int) or size < 0:
            raise FetchError(f"{where}.size: expected a non-negative integer", FetchResult.MANIFEST_FAILURE)
        platform = value.get("platform") or {}
        return cls(str(media_type), digest, size, platform if isinstance(platform, dict) else {})


@dataclass(frozen=True)
class Manifest:
    """An image manifest as fetched: its own digest, media type, config and layers."""

    digest: str
    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes, digest: str, content_type: str) -> Manifest:
        document = _parse_json_object(raw, "manifest")
        media_type = str(document.get("mediaType") or content_type.split(";")[0].strip())
        layers_json = document.get("layers")
        if not isinstance(layers_json, list):
            raise FetchError("manifest.layers: expected a list", FetchResult.MANIFEST_FAILURE)
        layers = tuple(
            Descriptor.from_json(layer, f"manifest.layers[{i}]") for i, layer in enumerate(layers_json)
        )
        config = Descriptor.from_json(document["config"], "manifest.config") if "config" in document else None
        return cls(digest, media_type, config, layers, raw)


def _parse_json_object(raw: bytes, what: str) -> dict[str, object]:
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FetchError(f"{what}: invalid JSON: {exc}", FetchResult.MANIFEST_FAILURE) from None
    if not isinstance(document, dict):
        raise FetchError(f"{what}: expected a JSON object", FetchResult.MANIFEST_FAILURE)
    return document


def pick_index_entry(index_raw: bytes) -> Descriptor:
    """The manifest an index points to for Wasm: a ``wasm``/``wasip*`` platform entry, else the first."""
    document = _parse_json_object(index_raw, "index")
    entries_json = document.get("manifests")
    if not isinstance(entries_json, list) or not entries_json:
        raise FetchError("index.manifests: expected a non-empty list", FetchResult.MANIFEST_FAILURE)
    entries = [Descriptor.from_json(entry, f"index.manifests[{i}]") for i, entry in enumerate(entries_json)]
    for entry in entries:
        if entry.platform.get("architecture") == "wasm" or str(entry.platform.get("os", "")).startswith(
            "wasi"
        ):
            return entry
    return entries[0]


@dataclass(frozen=True)
class AuthChallenge:
    scheme: str  # "basic" or "bearer", lower-case
    params: Mapping[str, str]

    @classmethod
    def parse(cls, header: str) -> AuthChallenge:
        scheme, _, rest = header.strip().partition(" ")
        params = {key.lower(): value for key, value in re.findall(r'(\w+)\s*=\s*"([^"]*)"', rest)}
        for key, value in re.findall(r'(\w+)\s*=\s*([^",\s]+)', rest):
            params.setdefault(key.lower(), value)
        return cls(scheme.lower(), params)


def _registry_error_text(response: HttpResponse) -> str:
    """``CODE: message`` from a distribution-spec error body, else the bare status."""
    try:
        errors = json.loads(response.body).get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}" for e in errors if isinstance(e, dict)]
        if parts:
            return "; ".join(parts)
    except (ValueError, AttributeError):
        pass
    return f"unexpected status code {response.status}"


ProgressCallback = Callable[[int, int | None], None]


class _StreamingDigest:
    """sha256 of a body as it streams in; restarted for every retry of the request."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def reset(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class RegistryClient:
    """Talks to one registry for one set of credentials; thread-safe, caches tokens per scope."""

    def __init__(
        self,
        registry: str,
        credential: RegistryCredential = ANONYMOUS,
        *,
        insecure: bool = False,
        request_timeout_s: float = 15.0,
        max_attempts: int = 5,
        initial_backoff_s: float = 0.5,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.registry = registry
        # Checked on every connection: the registry, its token realm, and blob redirects.
        self.policy = policy if policy is not None else AddressPolicy.from_env()
        self.credential = credential
        self.insecure = insecure  # listed insecure: TLS is not verified, plain HTTP is allowed
        self.plain_http_allowed = insecure or is_local_registry(registry)
        self.request_timeout_s = request_timeout_s
        self.max_attempts = max(max_attempts, 1)
        self.initial_backoff_s = initial_backoff_s
        api_host = _DOCKER_HUB_API_HOST if registry == DOCKER_HUB_REGISTRY else registry
        self._base_urls = [f"https://{api_host}"] + (
            [f"http://{api_host}"] if self.plain_http_allowed else []
        )
        self._authorization: dict[str, str] = {}  # scope -> Authorization header value
        self._lock = threading.Lock()

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Where requests go, in the order they are tried (the scheme that answered, once known)."""
        with self._lock:
            return tuple(self._base_urls)

    def _auth_header(self, scope: str) -> dict[str, str]:
        with self._lock:
            value = self._authorization.get(scope)
        return {"Authorization": value} if value else {}

    def _get(
        self,
        path: str,
        scope: str,
        *,
        accept: str = "",
        max_body_bytes: int,
        deadline: float | None,
        body_digest: _StreamingDigest | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> HttpResponse:
        """GET ``/v2/<path>``, answering at most one auth challenge; non-2xx responses are returned."""
        headers = {"Accept": accept} if accept else {}
        for attempt in range(2):
            response = self._send_with_retries(
                path,
                {**headers, **self._auth_header(scope)},
                max_body_bytes,
                deadline,
                body_digest,
                on_progress,
            )
            if response.status != 401 or attempt == 1:
                return response
            challenge_header = response.headers.get("www-authenticate", "")
            if not challenge_header:
                return response
            if not self._answer_challenge(AuthChallenge.parse(challenge_header), scope, deadline):
                return response
        raise AssertionError("unreachable")

    def _send_with_retries(
        self,
        path: str,
        headers: Mapping[str, str],
        max_body_bytes: int,
        deadline: float | None,
        body_digest: _StreamingDigest | None,
        on_progress: ProgressCallback | None,
    ) -> HttpResponse:
        """Retry transport errors and retryable statuses (5xx but 501/505/511, and 429) with backoff."""
        delays = backoff_delays(self.initial_backoff_s, self.max_attempts)
        for attempt in range(self.max_attempts):
            if body_digest is not None:
                body_digest.reset()
            last = attempt == self.max_attempts - 1
            try:
                response = self._send(
                    path,
                    headers,
                    max_body_bytes,
                    deadline,
                    body_digest.update if body_digest else None,
                    on_progress,
                )
            except PlainHttpRegistryError:
                raise  # asking again cannot change the registry's scheme
            except TransportError as exc:
                if exc.timed_out or exc.blocked or last:
                    raise
            else:
                if last or not (is_retryable_status(response.status) or response.status == 429):
                    return response
            if deadline is not None and time.monotonic() + delays[attempt] >= deadline:
                raise TransportError(
                    f"/v2/{path}", "context deadline exceeded while backing off", timed_out=True
                )
            time.sleep(delays[attempt])
        raise AssertionError("unreachable")

    def _send(
        self,
        path: str,
        headers: Mapping[str, str],
        max_body_bytes: int,
        deadline: float | None,
        on_chunk: Callable[[bytes], None] | None,
        on_progress: ProgressCallback | None,
    ) -> HttpResponse:
        """One GET, on HTTPS and (insecure and local registries only) then on plain HTTP."""
        last_error: TransportError | None = None
        for base_url in list(self._base_urls):
            try:
                response = http_request(
                    f"{base_url}/v2/{path}",
                    headers=headers,
                    timeout_s=self.request_timeout_s,
                    deadline=deadline,
                    verify_tls=not self.insecure,
                    max_body_bytes=max_body_bytes,
                    on_chunk=on_chunk,
                    on_progress=on_progress,
                    policy=self.policy,
                )
            except TransportError as exc:
                if exc.tls_plain_http and not self.plain_http_allowed:
                    raise PlainHttpRegistryError(f"{base_url}/v2/{path}", self.registry) from None
                last_error = exc
                if exc.timed_out or exc.blocked:
                    break
                continue
            with self._lock:  # remember the scheme that answered
                if self._base_urls[0] != base_url:
                    self._base_urls = [base_url]
            return response
        assert last_error is not None
        raise last_error

    def _answer_challenge(self, challenge: AuthChallenge, scope: str, deadline: float | None) -> bool:
        """Store an Authorization value for ``scope``; False when there is nothing new to try."""
        credential = self.credential
        if challenge.scheme == "basic":
            if not (credential.username or credential.password):
                return False
            token = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
            value = f"Basic {token}"
        elif challenge.scheme == "bearer":
            if credential.registry_token:
                value = f"Bearer {credential.registry_token}"
            else:
                value = f"Bearer {self._request_token(challenge, scope, deadline)}"
        else:
            return False
        with self._lock:
            self._authorization[scope] = value
        return True

    def _request_token(self, challenge: AuthChallenge, scope: str, deadline: float | None) -> str:
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise TransportError(realm or "<no realm>", f"bearer challenge has an invalid realm {realm!r}")
        query: dict[str, str] = {"scope": challenge.params.get("scope") or scope}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        credential = self.credential
        headers: dict[str, str] = {}
        method, body = "GET", None
        if credential.identity_token:  # OAuth2 refresh-token grant, as docker does with identity tokens
            method = "POST"
            body = urlencode(
                {
                    **query,
                    "grant_type": "refresh_token",
                    "client_id": "wasmesh",
                    "refresh_token": credential.identity_token,
                }
            ).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            url = realm
        else:
            url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
            if credential.username or credential.password:
                basic = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
                headers["Authorization"] = f"Basic {basic}"
        response = http_request(
            url,
            method=method,
            body=body,
            headers=headers,
            timeout_s=self.request_timeout_s,
            deadline=deadline,
            verify_tls=not self.insecure,
            max_body_bytes=1 << 20,
            policy=self.policy,
        )
        if response.status != 200:
            raise TransportError(
                url, f"token request failed: {_registry_error_text(response)} (status {response.status})"
            )
        try:
            document = json.loads(response.body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise TransportError(url, "token response has neither token nor access_token")
        return token

    def get_manifest(
        self, repository: str, reference: str, deadline: float | None = None
    ) -> tuple[bytes, str, str]:
        """(raw bytes, content type, sha256 digest) of a manifest or index; FetchError(manifest_failure)."""
        path = f"{repository}/manifests/{reference}"
        scope = f"repository:{repository}:pull"
        try:
            response = self._get(
                path, scope, accept=MANIFEST_ACCEPT, max_body_bytes=MAX_MANIFEST_BYTES, deadline=deadline
            )
        except TransportError as exc:
            raise FetchError(f"could not fetch manifest: {exc}", FetchResult.MANIFEST_FAILURE) from None
        except FetchError as exc:
            raise exc.wrap("could not fetch manifest", FetchResult.MANIFEST_FAILURE) from None
        if response.status != 200:
            raise FetchError(
                f"could not fetch manifest: GET {response.url}: {_registry_error_text(response)}",
                FetchResult.MANIFEST_FAILURE,
            )
        digest = "sha256:" + hashlib.sha256(response.body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            # A registry (or anything between) that serves other content for a digest is refused,
            # as go-containerregistry does ("manifest digest: ... does not match requested digest").
            raise FetchError(
                f"could not fetch manifest: manifest digest {digest} does not match requested digest "
                f"{reference} for {self.registry}/{repository}@{reference}",
                FetchResult.MANIFEST_FAILURE,
            )
        return response.body, response.headers.get("content-type", ""), digest

    def get_blob(
        self,
        repository: str,
        descriptor: Descriptor,
        *,
        max_bytes: int,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> bytes:
        """The verified content of a blob: size and sha256 must match the descriptor."""
        where = f"blob {descriptor.digest} of {self.registry}/{repository}"
        if descriptor.size > max_bytes:
            raise FetchError(
                f"{where} is {descriptor.size} bytes, which exceeds the size limit of {max_bytes} bytes",
                FetchResult.DOWNLOAD_FAILURE,
            )
        hasher = _StreamingDigest()
        try:
            response = self._get(
                f"{repository}/blobs/{descriptor.digest}",
                f"repository:{repository}:pull",
                max_body_bytes=min(max_bytes, descriptor.size),
                deadline=deadline,
                body_digest=hasher,
                on_progress=on_progress,
            )
        except TransportError as exc:
            raise FetchError(f"{where}: {exc}", FetchResult.DOWNLOAD_FAILURE) from None
        except FetchError as exc:
            raise exc.wrap(where, FetchResult.DOWNLOAD_FAILURE) from None
        if response.status != 200:
            raise FetchError(
                f"GET {response.url}: {_registry_error_text(response)}", FetchResult.DOWNLOAD_FAILURE
            )
        if len(response.body) != descriptor.size:
            raise FetchError(
                f"{where}: got {len(response.body)} bytes, the manifest says {descriptor.size}",
                FetchResult.DOWNLOAD_FAILURE,
            )
        actual = "sha256:" + hasher.hexdigest()
        if actual != descriptor.digest:
            raise FetchError(f"{where}: content has digest {actual}", FetchResult.DOWNLOAD_FAILURE)
        return response.body


def resolve_manifest(
    client: RegistryClient, reference: ImageReference, deadline: float | None = None
) -> Manifest:
    """The image manifest ``reference`` names; an index resolves to its Wasm (or first) entry.

    The returned ``Manifest.digest`` is the digest of the document the reference itself names (the
    index's digest for an index), which is what a ``@sha256:`` reference and a user ``sha256`` pin.
    """
    raw, content_type, digest = client.get_manifest(reference.repository, reference.reference, deadline)
    media_type = content_type.split(";")[0].strip()
    try:
        declared = json.loads(raw).get("mediaType") or media_type
    except (ValueError, AttributeError):
        declared = media_type
    if declared in INDEX_MEDIA_TYPES:
        entry = pick_index_entry(raw)
        child_raw, child_type, _ = client.get_manifest(reference.repository, entry.digest, deadline)
        manifest = Manifest.parse(child_raw, digest, child_type)
    else:
        manifest = Manifest.parse(raw, digest, media_type)
    return manifest


def deadline_after(seconds: float) -> float:
    return time.monotonic() + seconds
