"""Download a module over http(s) with Istio's retry policy (pkg/wasm/httpfetcher.go)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wasmesh.agent.errors import FetchError, FetchResult
from wasmesh.agent.ssrf import AddressPolicy
from wasmesh.agent.transport import TransportError, http_request
from wasmesh.agent.unbox import unbox_if_possible

BACKOFF_MULTIPLIER = 1.5
BACKOFF_RANDOMIZATION = 0.5
BACKOFF_MAX_INTERVAL_S = 60.0

ProgressCallback = Callable[[int, int | None], None]


def backoff_delays(initial_s: float, attempts: int) -> list[float]:
    """Randomised exponential delays between ``attempts`` tries (cenkalti/backoff defaults, as Istio uses)."""
    delays: list[float] = []
    interval = initial_s
    for _ in range(max(attempts - 1, 0)):
        spread = BACKOFF_RANDOMIZATION * interval
        delays.append(random.uniform(interval - spread, interval + spread))
        interval = min(interval * BACKOFF_MULTIPLIER, BACKOFF_MAX_INTERVAL_S)
    return delays


def is_retryable_status(status: int) -> bool:
    """Server errors are worth retrying, except the ones that will never change (501, 505, 511)."""
    return status >= 500 and status not in (501, 505, 511)


@dataclass(frozen=True)
class HttpFetcher:
    request_timeout_s: float = 15.0
    max_attempts: int = 5
    initial_backoff_s: float = 0.5
    max_body_bytes: int = 256 << 20
    policy: AddressPolicy = field(default_factory=AddressPolicy.from_env)

    def fetch(
        self,
        url: str,
        *,
        insecure: bool = False,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> bytes:
        """The unboxed body of ``url``; FetchError(download_failure) once the attempts are used up.

        ``deadline`` is a ``time.monotonic()`` instant bounding all attempts together.
        """
        delays = backoff_delays(self.initial_backoff_s, self.max_attempts)
        attempts = 0
        last_error = ""
        while attempts < self.max_attempts:
            attempts += 1
            try:
                response = http_request(
                    url,
                    timeout_s=self.request_timeout_s,
                    deadline=deadline,
                    verify_tls=not insecure,
                    max_body_bytes=self.max_body_bytes,
                    on_progress=on_progress,
                    policy=self.policy,
                )
            except TransportError as exc:
                last_error = str(exc)
                if exc.blocked:
                    break  # the destination is refused: it will be refused again
                if exc.timed_out and deadline is not None and time.monotonic() >= deadline:
                    break  # the caller's deadline is gone: another attempt cannot succeed
            except FetchError as exc:  # oversize body: retrying fetches the same bytes again
                raise FetchError(
                    f"wasm module download failed after {attempts} attempts, last error: {exc.message}",
                    FetchResult.DOWNLOAD_FAILURE,
                ) from None
            else:
                if response.status == 200:
                    try:
                        return unbox_if_possible(response.body, self.max_body_bytes)
                    except FetchError as exc:
                        raise exc.wrap(f"wasm module downloaded from {url} could not be unpacked") from None
                last_error = f"wasm module download request failed: status code {response.status}"
                if not is_retryable_status(response.status):
                    break
            if attempts < self.max_attempts:
                delay = delays[attempts - 1]
                if deadline is not None and time.monotonic() + delay >= deadline:
                    break
                time.sleep(delay)
        raise FetchError(
            f"wasm module download failed after {attempts} attempts, last error: {last_error}",
            FetchResult.DOWNLOAD_FAILURE,
        )
