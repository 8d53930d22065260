"""Read a module from a ``file://`` URL (absolute path, or relative to a base directory).

With ``allowed_dirs`` (``--allowed-file-dir``) the file must lie under one of them once symlinks and
``..`` are resolved. The check is made on the file actually opened (``/proc/self/fd``), so swapping a
path component for a symlink between the check and the open cannot escape it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _opened_path(descriptor: int, fallback: str) -> str:
    """The real path of an open file (Linux ``/proc``); ``fallback`` where /proc is not mounted."""
    try:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        return fallback


def fetch_file(
    url: str, max_bytes: int, base_dir: Path | None = None, allowed_dirs: Sequence[Path] = ()
) -> bytes:
    path = path_from_file_url(url, base_dir)
    allowed = [os.path.realpath(directory) for directory in allowed_dirs]
    outside = FetchError(
        f"file URL {url}: {path} is outside the allowed module directories "
        f"({', '.join(str(d) for d in allowed_dirs)}; --allowed-file-dir)",
        FetchResult.DOWNLOAD_FAILURE,
    )
    real = os.path.realpath(path)
    if allowed and not any(_is_under(real, directory) for directory in allowed):
        raise outside  # before opening: a path outside is never touched (FIFOs, devices)
    try:
        descriptor = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise FetchError(
            f"cannot read wasm module file {path}: {exc.strerror}", FetchResult.DOWNLOAD_FAILURE
        ) from None
    with os.fdopen(descriptor, "rb") as handle:
        if allowed and not any(_is_under(_opened_path(descriptor, real), d) for d in allowed):
            raise outside
        try:
            size = os.fstat(descriptor).st_size
            if size > max_bytes:
                raise FetchError(
                    f"wasm module file {path} is {size} bytes, which exceeds the size limit of "
                    f"{max_bytes} bytes",
                    FetchResult.DOWNLOAD_FAILURE,
                )
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise FetchError(
                f"cannot read wasm module file {path}: {exc.strerror}", FetchResult.DOWNLOAD_FAILURE
            ) from None
    if len(data) > max_bytes:  # grew after fstat, or a special file that reports size 0
        raise FetchError(
            f"wasm module file {path} exceeds the size limit of {max_bytes} bytes",
            FetchResult.DOWNLOAD_FAILURE,
        )
    return unbox_if_possible(data, max_bytes)
