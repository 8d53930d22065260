"""The single error type of module distribution and the metric results it maps to."""

from __future__ import annotations

from enum import StrEnum


class FetchResult(StrEnum):
    """Label values of ``istio_agent_wasm_remote_fetch_count{result=...}`` (Istio's exact strings)."""

    SUCCESS = "success"
    DOWNLOAD_FAILURE = "download_failure"
    MANIFEST_FAILURE = "manifest_failure"
    CHECKSUM_MISMATCHED = "checksum_mismatched"
    FETCH_FAILURE = "fetch_failure"


class FetchError(Exception):
    """A module could not be fetched; ``message`` is always one line.

    ``metric_result`` is the ``remote_fetch_count`` label this failure was (or would be) counted under.
    """

    def __init__(self, message: str, metric_result: FetchResult = FetchResult.DOWNLOAD_FAILURE) -> None:
        self.message = " ".join(message.split())  # force one line: nested causes may carry newlines
        self.metric_result = metric_result
        super().__init__(self.message)

    def wrap(self, prefix: str, metric_result: FetchResult | None = None) -> FetchError:
        """A new error reading ``<prefix>: <this message>`` (Go's ``fmt.Errorf("...: %v", err)``)."""
        return FetchError(f"{prefix}: {self.message}", metric_result or self.metric_result)
