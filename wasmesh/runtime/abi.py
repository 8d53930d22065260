"""Proxy-Wasm ABI constants: statuses, buffer/map/stream types, ABI versions, log levels.

Values are those of the 0.2.x spec and proxy-wasm-cpp-sdk (see
shared/reference/proxy-wasm-abi.md §1.3); Higress additions are marked.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class AbiVersion(Enum):
    V0_1_0 = "0_1_0"
    V0_2_0 = "0_2_0"
    V0_2_1 = "0_2_1"
    V0_2_100 = "0_2_100"  # Higress fork

    @property
    def export_name(self) -> str:
        return f"proxy_abi_version_{self.value}"


ABI_MARKER_PREFIX = "proxy_abi_version_"
ABI_BY_EXPORT: dict[str, AbiVersion] = {v.export_name: v for v in AbiVersion}


class WasmResult(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    BAD_EXPRESSION = 5
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    RESULT_MISMATCH = 9
    INTERNAL_FAILURE = 10
    BROKEN_CONNECTION = 11
    UNIMPLEMENTED = 12


class LogLevel(IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class BufferType(IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_RECEIVE_BUFFER = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    CALL_DATA = 8  # foreign function arguments
    REDIS_CALL_RESPONSE = 9  # Higress


class MapType(IntEnum):
    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_RECEIVE_INITIAL_METADATA = 4
    GRPC_RECEIVE_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class StreamType(IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType(IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class WasiErrno(IntEnum):
    SUCCESS = 0
    BADF = 8
    FAULT = 21
    INVAL = 28
    NOENT = 44
    NOSYS = 52
    NOTSUP = 58
    NOTCAPABLE = 76


# Limits on pair-serialised maps, as proxy-wasm-cpp-host include/proxy-wasm/limits.h.
PAIRS_MAX_BYTES = 1 << 20
PAIRS_MAX_COUNT = 1024

# Largest random_get request cpp-host honours (exports.cc: above this returns EINVAL).
RANDOM_GET_MAX_BYTES = 64 * 1024

# send_local_response: grpc_status outside 0..16 means "no grpc-status".
GRPC_STATUS_MAX = 16
