"""The verified, content-addressed module cache of the agent (Istio's pkg/wasm/cache.go, plus fixes).

Keys and pull policies follow Istio exactly: a module is ``(name, checksum)`` where ``name`` is the
tag/digest-stripped OCI name or the verbatim URL, and ``checksum`` is the manifest digest (OCI) or the
sha256 of the unboxed bytes (http/file). Tagged URLs remember the checksum they last resolved to, per
resource version, so ``Always`` re-pulls exactly when a resource version changes.

Differences from Istio, on purpose:
* concurrent requests for one module share ONE download (single-flight);
* files are written atomically (temp file, fsync, rename) and an index is persisted, so a crash never
  leaves a partial file and the cache survives restarts (entries are re-verified when loaded);
* expiry never deletes a module that is the current module of a resource (istio#53891): resources
  claim the module they last resolved to until ``release(resource_name)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from wasmesh.agent.errors import FetchError, FetchResult
from wasmesh.agent.filefetch import fetch_file
from wasmesh.agent.httpfetch import HttpFetcher
from wasmesh.agent.imagefetch import PreparedImage, prepare_image
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.oci import ImageReference
from wasmesh.agent.options import DEFAULT_GET_TIMEOUT_S, PULL_POLICIES, CacheOptions
from wasmesh.agent.unbox import is_valid_wasm

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_VERSION = 1
_TEMP_MARK = ".tmp-"
ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class ModuleKey:
    name: str
    checksum: str


@dataclass
class _ModuleEntry:
    path: Path
    wasm_sha256: str  # of the file's bytes; differs from the key's checksum for OCI
    last_used: float  # wall clock, refreshed by lookups
    referencing_urls: set[str] = field(default_factory=set)
    private: bool = False  # fetched with a pull secret: hits must re-prove access


@dataclass
class _ChecksumEntry:
    checksum: str
    resource_versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleRequest:
    """One normalised ``get`` call."""

    url: str
    scheme: str
    name: str
    sha256: str
    ignore_resource_version: bool
    pull_secret: bytes
    resource_name: str
    resource_version: str
    insecure: bool
    image: ImageReference | None

    @property
    def remembers_checksum(self) -> bool:
        """Tagged OCI and http URLs remember what they resolved to; digest-pinned OCI and files do not."""
        if self.scheme == "file":
            return False
        return self.image is None or not self.image.digest

    @property
    def flight_key(self) -> tuple[str, str, str]:
        secret = hashlib.sha256(self.pull_secret).hexdigest() if self.pull_secret else ""
        return (self.url, self.sha256, secret)


def module_name_from_url(url: str) -> str:
    """Istio's ``moduleNameFromURL``: OCI names lose their tag/digest, other URLs stay verbatim."""
    if url.startswith("oci://"):
        try:
            return "oci://" + ImageReference.parse(url).name
        except ValueError:
            return url
    return url


def should_ignore_resource_version(pull_policy: str, url: str) -> bool:
    """IfNotPresent ignores resource versions; Always does not; unspecified = IfNotPresent except ``oci://…:latest``."""
    if pull_policy == "Always":
        return False
    if pull_policy == "IfNotPresent":
        return True
    return not (url.startswith("oci://") and urlsplit(url).path.endswith(":latest"))


def module_path(cache_dir: Path, key: ModuleKey) -> Path:
    """``<dir>/<sha256(name)>/<checksum>.wasm``, Istio's layout."""
    return cache_dir / hashlib.sha256(key.name.encode()).hexdigest() / f"{key.checksum}.wasm"


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it, even after a crash."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}{_TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class ModuleCache:
    """Fetch-through cache of Wasm modules; ``get`` returns the local path of a verified module."""

    def __init__(self, options: CacheOptions | None = None, metrics: AgentMetrics | None = None) -> None:
        self.options = options or CacheOptions()
        self.metrics = metrics or AgentMetrics()
        self.dir = self.options.dir
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._http = HttpFetcher(
            request_timeout_s=self.options.http_timeout_s,
            max_attempts=self.options.http_max_retries,
            initial_backoff_s=self.options.http_initial_backoff_s,
            max_body_bytes=self.options.max_module_bytes,
            policy=self.options.address_policy,
        )
        self._lock = threading.Lock()
        self._modules: dict[ModuleKey, _ModuleEntry] = {}
        self._checksums: dict[str, _ChecksumEntry] = {}
        self._claims: dict[str, ModuleKey] = {}  # resource name -> module it currently uses
        self._in_flight: dict[tuple[str, str, str], concurrent.futures.Future[Path]] = {}
        self._closed = False
        self._load_index()

    # ----------------------------------------------------------------------------------- public API

    async def get(
        self,
        url: str,
        *,
        sha256: str = "",
        pull_policy: str = "UNSPECIFIED_POLICY",
        pull_secret: bytes = b"",
        resource_name: str = "",
        resource_version: str = "",
        timeout_s: float = DEFAULT_GET_TIMEOUT_S,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """The local path of the module at ``url``, fetching it at most once however many callers wait."""
        request = self._make_request(url, sha256, pull_policy, pull_secret, resource_name, resource_version)
        path, checksum, private_hit = self._lookup(request)
        if path is not None and not private_hit:
            return path
        future, leader = self._join_flight(request)
        if leader:
            self._start_background_fetch(future, request, checksum, private_hit, timeout_s, on_progress)
        try:
            path = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
        except TimeoutError:
            raise FetchError(
                f"wasm module {request.url} was not fetched within {timeout_s:g} s",
                FetchResult.DOWNLOAD_FAILURE,
            ) from None
        if not leader:
            self._record_shared_result(request, path)
        return path

    def get_sync(
        self,
        url: str,
        *,
        sha256: str = "",
        pull_policy: str = "UNSPECIFIED_POLICY",
        pull_secret: bytes = b"",
        resource_name: str = "",
        resource_version: str = "",
        timeout_s: float = DEFAULT_GET_TIMEOUT_S,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Blocking ``get`` for CLIs and threads (never call it on an event loop thread)."""
        request = self._make_request(url, sha256, pull_policy, pull_secret, resource_name, resource_version)
        path, checksum, private_hit = self._lookup(request)
        if path is not None and not private_hit:
            return path
        future, leader = self._join_flight(request)
        if leader:
            self._lead_fetch(
                future, request, checksum, private_hit, time.monotonic() + timeout_s, on_progress
            )
        try:
            path = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise FetchError(
                f"wasm module {request.url} was not fetched within {timeout_s:g} s",
                FetchResult.DOWNLOAD_FAILURE,
            ) from None
        if not leader:
            self._record_shared_result(request, path)
        return path

    def release(self, resource_name: str) -> None:
        """The resource no longer exists: its module may expire again."""
        with self._lock:
            self._claims.pop(resource_name, None)

    def purge_expired(self, now: float | None = None) -> list[Path]:
        """Delete modules unused for ``module_expiry_s`` and claimed by no resource; returns their paths."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        with self._lock:
            claimed = set(self._claims.values())
            for key, entry in list(self._modules.items()):
                if key in claimed or now - entry.last_used <= self.options.module_expiry_s:
                    continue
                try:
                    entry.path.unlink(missing_ok=True)
                except OSError as exc:
                    log.error("failed to purge Wasm module %s: %s", entry.path, exc.strerror)
                    continue
                for url in entry.referencing_urls:
                    self._checksums.pop(url, None)
                del self._modules[key]
                removed.append(entry.path)
            if removed:
                self._save_index_locked()
            self.metrics.cache_entries.set(len(self._modules))
        return removed

    async def run_purger(self) -> None:
        """Purge every ``purge_interval_s`` until cancelled (run it as a task next to the xDS proxy)."""
        while True:
            await asyncio.sleep(self.options.purge_interval_s)
            await asyncio.to_thread(self.purge_expired)

    def close(self) -> None:
        """No new background fetches; the ones in flight are abandoned (they never block an exit)."""
        self._closed = True

    def entry_count(self) -> int:
        with self._lock:
            return len(self._modules)

    # ------------------------------------------------------------------------------ request handling

    def _make_request(
        self,
        url: str,
        sha256: str,
        pull_policy: str,
        pull_secret: bytes,
        resource_name: str,
        resource_version: str,
    ) -> ModuleRequest:
        if pull_policy not in PULL_POLICIES:
            raise FetchError(
                f"pull_policy: unknown value {pull_policy!r}, expected one of {', '.join(PULL_POLICIES)}",
                FetchResult.FETCH_FAILURE,
            )
        if sha256 and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)):
            raise FetchError(
                f"sha256: expected 64 lower-case hex characters, got {sha256!r}", FetchResult.FETCH_FAILURE
            )
        normalized = url.strip()
        if "://" not in normalized and not normalized.startswith("file:"):
            normalized = "oci://" + normalized  # no scheme means OCI, as istiod defaults it
        parts = urlsplit(normalized)
        scheme = parts.scheme.lower()
        image: ImageReference | None = None
        if scheme == "oci":
            try:
                image = ImageReference.parse(normalized)
            except ValueError as exc:
                raise FetchError(
                    f"fail to parse Wasm module fetch url: {normalized}, error: {exc}",
                    FetchResult.FETCH_FAILURE,
                ) from None
        elif scheme not in ("http", "https", "file"):
            raise FetchError(
                f"unsupported Wasm module downloading URL scheme: {scheme or '<none>'}",
                FetchResult.FETCH_FAILURE,
            )
        return ModuleRequest(
            url=normalized,
            scheme=scheme,
            name=module_name_from_url(normalized),
            sha256=sha256,
            ignore_resource_version=should_ignore_resource_version(pull_policy, normalized),
            pull_secret=pull_secret,
            resource_name=resource_name,
            resource_version=resource_version,
            insecure=self.options.allow_insecure(parts.netloc),
            image=image,
        )

    def _lookup(self, request: ModuleRequest) -> tuple[Path | None, str, bool]:
        """(path on a hit, checksum to fetch with, whether the hit is private and needs re-checking)."""
        checksum = request.sha256
        if not checksum and request.image is not None and request.image.digest:
            checksum = request.image.digest.removeprefix("sha256:")
        with self._lock:
            if not checksum and request.remembers_checksum:
                remembered = self._checksums.get(request.url)
                if remembered is not None:
                    same_version = (
                        remembered.resource_versions.get(request.resource_name) == request.resource_version
                    )
                    if request.ignore_resource_version or same_version:
                        checksum = remembered.checksum
                    if not same_version:
                        remembered.resource_versions[request.resource_name] = request.resource_version
                        self._save_index_locked()
            entry = self._modules.get(ModuleKey(request.name, checksum)) if checksum else None
            hit = entry is not None
            if entry is not None:
                entry.last_used = time.time()
                self._remember_locked(request, checksum, entry)
        self.metrics.record_lookup(hit)
        if entry is None:
            return None, checksum, False
        private_hit = entry.private and request.image is not None
        return entry.path, checksum, private_hit

    def _record_shared_result(self, request: ModuleRequest, path: Path) -> None:
        """A follower of a shared download records its own resource version and claim, as a lookup would."""
        with self._lock:
            entry = self._modules.get(ModuleKey(request.name, path.stem))
            if entry is not None:
                entry.last_used = time.time()
                self._remember_locked(request, path.stem, entry)

    def _join_flight(self, request: ModuleRequest) -> tuple[concurrent.futures.Future[Path], bool]:
        with self._lock:
            existing = self._in_flight.get(request.flight_key)
            if existing is not None:
                return existing, False
            future: concurrent.futures.Future[Path] = concurrent.futures.Future()
            self._in_flight[request.flight_key] = future
            return future, True

    def _start_background_fetch(
        self,
        future: concurrent.futures.Future[Path],
        request: ModuleRequest,
        checksum: str,
        private_hit: bool,
        timeout_s: float,
        on_progress: ProgressCallback | None,
    ) -> None:
        """Run the leader's fetch on a daemon thread.

        Daemon, not a ThreadPoolExecutor worker: the interpreter joins executor threads at exit, so a
        proxy told to stop while a registry stalls would wait out the request timeout (15 s by
        default) before exiting. An abandoned fetch leaves nothing half-written: files and the index
        are written atomically, and stray temp files are removed on the next start.
        """
        if self._closed:
            with self._lock:
                self._in_flight.pop(request.flight_key, None)
            future.set_exception(
                FetchError(f"cannot fetch Wasm module {request.url}: the module cache is closed")
            )
            return
        deadline = time.monotonic() + timeout_s
        threading.Thread(
            target=self._lead_fetch,
            args=(future, request, checksum, private_hit, deadline, on_progress),
            name=f"wasm-fetch {request.url}",
            daemon=True,
        ).start()

    def _lead_fetch(
        self,
        future: concurrent.futures.Future[Path],
        request: ModuleRequest,
        checksum: str,
        private_hit: bool,
        deadline: float,
        on_progress: ProgressCallback | None,
    ) -> None:
        try:
            path = self._fetch(request, checksum, private_hit, deadline, on_progress)
        except BaseException as exc:  # every waiter must be released, whatever happened
            error = (
                exc
                if isinstance(exc, FetchError)
                else FetchError(
                    f"could not fetch Wasm module {request.url}: {type(exc).__name__}: {exc}",
                    FetchResult.FETCH_FAILURE,
                )
            )
            with self._lock:
                self._in_flight.pop(request.flight_key, None)
            future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            self._in_flight.pop(request.flight_key, None)
        future.set_result(path)

    def _fetch(
        self,
        request: ModuleRequest,
        checksum: str,
        private_hit: bool,
        deadline: float,
        on_progress: ProgressCallback | None,
    ) -> Path:
        """Istio's ``getOrFetch`` after the first lookup missed (network without the lock)."""
        prepared: PreparedImage | None = None
        data: bytes | None = None
        if request.image is not None:
            try:
                prepared = prepare_image(
                    request.image,
                    pull_secret=request.pull_secret,
                    insecure=request.insecure,
                    request_timeout_s=self.options.http_timeout_s,
                    max_attempts=self.options.http_max_retries,
                    initial_backoff_s=self.options.http_initial_backoff_s,
                    max_bytes=self.options.max_module_bytes,
                    docker_config_dir=self.options.docker_config_dir,
                    deadline=deadline,
                    policy=self.options.address_policy,
                )
            except FetchError as exc:
                self.metrics.record_fetch(FetchResult.MANIFEST_FAILURE)
                raise exc.wrap("could not fetch Wasm OCI image", FetchResult.MANIFEST_FAILURE) from None
            fetched_checksum = prepared.digest_hex
            if private_hit:  # access re-proven with this caller's credentials: serve the cached copy
                path = self._hit_after_fetch(request, checksum)
                if path is not None:
                    return path
        else:
            try:
                if request.scheme == "file":
                    data = fetch_file(
                        request.url,
                        self.options.max_module_bytes,
                        self.options.file_base_dir,
                        self.options.allowed_file_dirs,
                    )
                else:
                    data = self._http.fetch(
                        request.url, insecure=request.insecure, deadline=deadline, on_progress=on_progress
                    )
            except FetchError as exc:
                self.metrics.record_fetch(FetchResult.DOWNLOAD_FAILURE)
                raise FetchError(exc.message, FetchResult.DOWNLOAD_FAILURE) from None
            fetched_checksum = hashlib.sha256(data).hexdigest()

        if not checksum:
            checksum = fetched_checksum
            path = self._hit_after_fetch(request, checksum)  # a tag may have moved to a cached image
            if path is not None:
                return path
        elif fetched_checksum != checksum:
            self.metrics.record_fetch(FetchResult.CHECKSUM_MISMATCHED)
            if request.scheme == "file":
                # Never the actual digest: that would make the agent an oracle for the sha256 of any
                # file it can read (Istio's message names both).
                raise FetchError(
                    f"module read from {request.url} does not match the expected checksum {checksum}",
                    FetchResult.CHECKSUM_MISMATCHED,
                )
            raise FetchError(
                f"module downloaded from {request.url} has checksum {fetched_checksum}, "
                f"which does not match: {checksum}",
                FetchResult.CHECKSUM_MISMATCHED,
            )

        if prepared is not None:
            try:
                data = prepared.fetch_binary(deadline, on_progress)
            except FetchError as exc:
                self.metrics.record_fetch(FetchResult.DOWNLOAD_FAILURE)
                raise exc.wrap("could not fetch Wasm binary", FetchResult.DOWNLOAD_FAILURE) from None
        assert data is not None
        if not is_valid_wasm(data):
            self.metrics.record_fetch(FetchResult.FETCH_FAILURE)
            raise FetchError(f"fetched Wasm binary from {request.url} is invalid", FetchResult.FETCH_FAILURE)
        self.metrics.record_fetch(FetchResult.SUCCESS)
        return self._add_entry(request, ModuleKey(request.name, checksum), data)

    def _hit_after_fetch(self, request: ModuleRequest, checksum: str) -> Path | None:
        with self._lock:
            entry = self._modules.get(ModuleKey(request.name, checksum))
            if entry is not None:
                entry.last_used = time.time()
                self._remember_locked(request, checksum, entry)
        self.metrics.record_lookup(entry is not None)
        return entry.path if entry is not None else None

    def _remember_locked(self, request: ModuleRequest, checksum: str, entry: _ModuleEntry) -> None:
        """Record what ``request.url`` resolved to and which module the resource now uses."""
        changed = False
        if request.remembers_checksum:
            remembered = self._checksums.get(request.url)
            if remembered is None:
                remembered = self._checksums[request.url] = _ChecksumEntry(checksum)
                changed = True
            if remembered.checksum != checksum:
                remembered.checksum = checksum
                changed = True
            if remembered.resource_versions.get(request.resource_name) != request.resource_version:
                remembered.resource_versions[request.resource_name] = request.resource_version
                changed = True
            if request.url not in entry.referencing_urls:
                entry.referencing_urls.add(request.url)
                changed = True
        if request.resource_name:
            self._claims[request.resource_name] = ModuleKey(request.name, checksum)
        if changed:
            self._save_index_locked()

    def _add_entry(self, request: ModuleRequest, key: ModuleKey, data: bytes) -> Path:
        path = module_path(self.dir, key)
        with self._lock:
            entry = self._modules.get(key)
        if entry is None:
            _atomic_write(path, data)  # outside the lock: disk I/O must not stall lookups
        with self._lock:
            entry = self._modules.get(key)
            if entry is None:
                entry = _ModuleEntry(
                    path,
                    hashlib.sha256(data).hexdigest(),
                    time.time(),
                    private=bool(request.pull_secret) and request.image is not None,
                )
                self._modules[key] = entry
            entry.last_used = time.time()
            self._remember_locked(request, key.checksum, entry)
            self._save_index_locked()
            self.metrics.cache_entries.set(len(self._modules))
            return entry.path

    # ------------------------------------------------------------------------------- persistence

    def _save_index_locked(self) -> None:
        document = {
            "version": INDEX_VERSION,
            "modules": [
                {
                    "name": key.name,
                    "checksum": key.checksum,
                    "file": str(entry.path.relative_to(self.dir)),
                    "wasm_sha256": entry.wasm_sha256,
                    "last_used": entry.last_used,
                    "urls": sorted(entry.referencing_urls),
                    "private": entry.private,
                }
                for key, entry in self._modules.items()
            ],
            "checksums": {
                url: {"checksum": c.checksum, "resource_versions": c.resource_versions}
                for url, c in self._checksums.items()
            },
        }
        _atomic_write(self.dir / INDEX_FILE, json.dumps(document, indent=1, sort_keys=True).encode())

    def _load_index(self) -> None:
        """Rebuild the maps from the index; entries whose file is gone or altered are dropped."""
        for leftover in self.dir.glob(f"*/.*{_TEMP_MARK}*"):
            leftover.unlink(missing_ok=True)  # a crash mid-write; never a valid module
        index_path = self.dir / INDEX_FILE
        try:
            document = json.loads(index_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable cache index, starting empty: %s", index_path, exc)
            return
        if not isinstance(document, dict) or document.get("version") != INDEX_VERSION:
            log.warning("%s: unknown cache index version, starting empty", index_path)
            return
        now = time.time()
        dropped = False
        for item in document.get("modules", []):
            try:
                key = ModuleKey(str(item["name"]), str(item["checksum"]))
                path = self.dir / str(item["file"])
                if path != module_path(self.dir, key):
                    raise ValueError("file does not match the key")
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != item["wasm_sha256"] or not is_valid_wasm(data):
                    raise ValueError("content does not match the recorded sha256")
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.warning("%s: dropping cache entry %r: %s", index_path, item, exc)
                dropped = True
                continue
            # A restart restarts the expiry clock: the proxy may still be running the module.
            self._modules[key] = _ModuleEntry(
                path,
                str(item["wasm_sha256"]),
                now,
                set(item.get("urls", [])),
                bool(item.get("private", False)),
            )
        known = {entry.checksum for entry in self._modules}
        for url, value in (document.get("checksums") or {}).items():
            if isinstance(value, dict) and value.get("checksum") in known:
                self._checksums[url] = _ChecksumEntry(
                    str(value["checksum"]), dict(value.get("resource_versions") or {})
                )
        if dropped:
            with self._lock:
                self._save_index_locked()
        self.metrics.cache_entries.set(len(self._modules))
