"""Read a module from a ``file://`` URL (absolute path, or relative to a base directory)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from wasmesh.agent.errors import FetchError, FetchResult
from wasmesh.agent.unbox import unbox_if_possible


def path_from_file_url(url: str, base_dir: Path | None = None) -> Path:
    """``file:///abs/x.wasm`` -> /abs/x.wasm; ``file://rel/x.wasm`` or ``file:rel`` -> base_dir/rel/x.wasm."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise FetchError(f"not a file URL: {url}", FetchResult.DOWNLOAD_FAILURE)
    raw = unquote(parts.netloc + parts.path)
    if parts.netloc in ("", "localhost") and parts.path.startswith("/"):
        return Path(unquote(parts.path))
    if base_dir is None:
        raise FetchError(f"relative file URL {url} needs a base directory", FetchResult.DOWNLOAD_FAILURE)
    return base_dir / raw


def fetch_file(url: str, max_bytes: int, base_dir: Path | None = None) -> bytes:
    path = path_from_file_url(url, base_dir)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError(
                f"wasm module file {path} is {size} bytes, which exceeds the size limit of {max_bytes} bytes",
                FetchResult.DOWNLOAD_FAILURE,
            )
        data = path.read_bytes()
    except OSError as exc:
        raise FetchError(
            f"cannot read wasm module file {path}: {exc.strerror}", FetchResult.DOWNLOAD_FAILURE
        ) from None
    return unbox_if_possible(data, max_bytes)
