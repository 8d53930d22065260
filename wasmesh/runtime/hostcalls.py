"""Every ``proxy_*`` import (ABI 0.1.0, 0.2.0, 0.2.1, Higress 0_2_100) and Envoy's extras.

Each host call is written once, against the effective ``Context`` (contexts.py) and
the VM's memory. All names are registered whatever ABI marker a module declares.

Memory returned to the plugin is allocated in the guest with exactly the size needed,
never 0 bytes (an empty result is written as ptr=0, size=0), through the VM's
allocator (see ``PluginVm.allocate``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from wasmesh.http.headers import HeaderMap
from wasmesh.runtime.abi import GRPC_STATUS_MAX, AbiVersion, BufferType, LogLevel, MapType, WasmResult
from wasmesh.runtime.contexts import Context, HttpCallResponse
from wasmesh.runtime.engine import FuncSig, HostFunc, WasmInstance, sig
from wasmesh.runtime.pairs import PairsError, decode_pairs, decode_property_path, encode_pairs
from wasmesh.runtime.properties import get_property, set_property

if TYPE_CHECKING:
    from wasmesh.runtime.vm import PluginVm

_LAST_MAP_TYPE = int(MapType.HTTP_CALL_RESPONSE_TRAILERS)

OK = WasmResult.OK
NOT_FOUND = WasmResult.NOT_FOUND
BAD_ARGUMENT = WasmResult.BAD_ARGUMENT
INVALID_MEMORY_ACCESS = WasmResult.INVALID_MEMORY_ACCESS
UNIMPLEMENTED = WasmResult.UNIMPLEMENTED


def _foreign_compress(args: bytes) -> tuple[WasmResult, bytes]:
    return OK, zlib.compress(args)


def _foreign_uncompress(args: bytes) -> tuple[WasmResult, bytes]:
    try:
        return OK, zlib.decompress(args)
    except zlib.error:
        return WasmResult.SERIALIZATION_FAILURE, b""


# Envoy's foreign functions (source/extensions/common/wasm/foreign.cc) that need no proto parsing.
FOREIGN_FUNCTIONS: dict[str, Callable[[bytes], tuple[WasmResult, bytes]]] = {
    "compress": _foreign_compress,
    "uncompress": _foreign_uncompress,
}


class HostCalls:
    """The ``env`` imports of one VM."""

    def __init__(self, vm: PluginVm) -> None:
        self.vm = vm

    def bind(self, instance: WasmInstance) -> None:
        """Resolve the memory helpers once the VM's instance exists (they run on every host call)."""
        self._read: Callable[[int, int], bytes | None] = instance.read

    # -- helpers ----------------------------------------------------------------------
    @property
    def ctx(self) -> Context:
        vm = self.vm
        return vm._effective if vm._effective is not None else vm._vm_context

    def _write_u32(self, ptr: int, value: int) -> WasmResult:
        return OK if self.vm.instance.write_u32(ptr, value) else INVALID_MEMORY_ACCESS

    # -- logging, time, timers ----------------------------------------------------------
    def proxy_log(self, level: int, msg_ptr: int, msg_len: int) -> int:
        if level > LogLevel.CRITICAL:
            return BAD_ARGUMENT
        message = self._read(msg_ptr, msg_len)
        if message is None:
            return INVALID_MEMORY_ACCESS
        if level < self.vm.services.log_level:
            return OK  # below the log level: not decoded
        self.vm.log(level, message.decode("utf-8", "replace"))
        return OK

    def proxy_get_log_level(self, level_ptr: int) -> int:
        return self._write_u32(level_ptr, int(self.vm.services.log_level))

    def proxy_get_current_time_nanoseconds(self, time_ptr: int) -> int:
        return OK if self.vm.instance.write_u64(time_ptr, time.time_ns()) else INVALID_MEMORY_ACCESS

    def proxy_set_tick_period_milliseconds(self, period_ms: int) -> int:
        self.vm.set_tick_period(self.ctx.root, period_ms)
        return OK

    # -- configuration (0.1.0) -------------------------------------------------------------
    def proxy_get_configuration(self, ptr_ptr: int, size_ptr: int) -> int:
        root = self.ctx.root
        config = root.identity.configuration if self.vm.in_configure else root.identity.vm_config
        return self.vm.copy_out(config, ptr_ptr, size_ptr)

    # -- buffers ---------------------------------------------------------------------
    def proxy_get_buffer_bytes(
        self, buf_type: int, start: int, max_size: int, ptr_ptr: int, size_ptr: int
    ) -> int:
        if buf_type > BufferType.REDIS_CALL_RESPONSE:
            return BAD_ARGUMENT
        data = self.ctx.buffer(buf_type)
        if data is None:
            return NOT_FOUND
        if start > len(data):
            return BAD_ARGUMENT
        end = min(len(data), start + max_size)
        return self.vm.copy_out(data[start:end], ptr_ptr, size_ptr)

    def proxy_get_buffer_status(self, buf_type: int, len_ptr: int, flags_ptr: int) -> int:
        if buf_type > BufferType.REDIS_CALL_RESPONSE:
            return BAD_ARGUMENT
        data = self.ctx.buffer(buf_type)
        if data is None:
            return NOT_FOUND
        if self._write_u32(len_ptr, len(data)) != OK:
            return INVALID_MEMORY_ACCESS
        return self._write_u32(flags_ptr, 0)

    def proxy_set_buffer_bytes(
        self, buf_type: int, start: int, size: int, data_ptr: int, data_len: int
    ) -> int:
        if buf_type > BufferType.REDIS_CALL_RESPONSE:
            return BAD_ARGUMENT
        data = self._read(data_ptr, data_len)
        if data is None:
            return INVALID_MEMORY_ACCESS
        return self.ctx.set_buffer(buf_type, start, size, data)

    # -- header maps ----------------------------------------------------------------------
    def _map(self, map_type: int) -> HeaderMap | None:
        if map_type > _LAST_MAP_TYPE:
            return None
        vm = self.vm
        return (vm._effective if vm._effective is not None else vm._vm_context).header_map(map_type)

    def proxy_get_header_map_size(self, map_type: int, size_ptr: int) -> int:
        headers = self._map(map_type)
        if headers is None:
            return BAD_ARGUMENT
        return self._write_u32(size_ptr, headers.byte_size())

    def proxy_get_header_map_pairs(self, map_type: int, ptr_ptr: int, size_ptr: int) -> int:
        headers = self._map(map_type)
        if headers is None or len(headers) == 0:
            # An absent or empty map reads as ptr=0,size=0 (cpp-host).
            return self.vm.copy_out(b"", ptr_ptr, size_ptr)
        return self.vm.copy_out(encode_pairs(headers.pairs()), ptr_ptr, size_ptr)

    def proxy_set_header_map_pairs(self, map_type: int, ptr: int, size: int) -> int:
        headers = self.ctx.writable_header_map(map_type)
        if headers is None:
            return BAD_ARGUMENT
        raw = self._read(ptr, size)
        if raw is None:
            return INVALID_MEMORY_ACCESS
        try:
            pairs = decode_pairs(raw)
        except PairsError:
            return BAD_ARGUMENT
        headers.replace_all(pairs)
        return OK

    def proxy_get_header_map_value(
        self, map_type: int, key_ptr: int, key_len: int, ptr_ptr: int, size_ptr: int
    ) -> int:
        headers = self._map(map_type)
        if headers is None:
            return BAD_ARGUMENT
        key = self._read(key_ptr, key_len)
        if key is None:
            return INVALID_MEMORY_ACCESS
        value = headers.get(key)
        if value is None:
            if self.vm.abi == AbiVersion.V0_1_0:
                return self.vm.copy_out(b"", ptr_ptr, size_ptr)
            return NOT_FOUND
        return self.vm.copy_out(value, ptr_ptr, size_ptr)

    def _change_header(
        self, map_type: int, key_ptr: int, key_len: int, val_ptr: int, val_len: int,
        change: Callable[[HeaderMap, bytes, bytes], None],
    ) -> int:
        vm = self.vm
        ctx = vm._effective if vm._effective is not None else vm._vm_context  # self.ctx, inlined
        headers = ctx.writable_header_map(map_type)
        if headers is None:
            return BAD_ARGUMENT
        inst = vm.instance
        view = inst._view
        if view is not None and key_ptr + key_len <= inst._mem_size and val_ptr + val_len <= inst._mem_size:
            # WasmInstance.read twice, written out (headers change on nearly every request).
            key = view[key_ptr : key_ptr + key_len].tobytes()
            value = view[val_ptr : val_ptr + val_len].tobytes()
        else:
            maybe_key, maybe_value = inst.read(key_ptr, key_len), inst.read(val_ptr, val_len)
            if maybe_key is None or maybe_value is None:
                return INVALID_MEMORY_ACCESS
            key, value = maybe_key, maybe_value
        change(headers, key, value)
        return OK

    def proxy_add_header_map_value(self, map_type: int, key_ptr: int, key_len: int, val_ptr: int,
                                   val_len: int) -> int:
        return self._change_header(map_type, key_ptr, key_len, val_ptr, val_len, HeaderMap.add)

    def proxy_replace_header_map_value(self, map_type: int, key_ptr: int, key_len: int, val_ptr: int,
                                       val_len: int) -> int:
        return self._change_header(map_type, key_ptr, key_len, val_ptr, val_len, HeaderMap.set)

    def proxy_remove_header_map_value(self, map_type: int, key_ptr: int, key_len: int) -> int:
        headers = self.ctx.writable_header_map(map_type)
        if headers is None:
            return BAD_ARGUMENT
        key = self._read(key_ptr, key_len)
        if key is None:
            return INVALID_MEMORY_ACCESS
        headers.remove(key)
        return OK

    # -- stream control and local replies ----------------------------------------------------
    def proxy_continue_request(self) -> int:
        return self.ctx.continue_stream(0)

    def proxy_continue_response(self) -> int:
        return self.ctx.continue_stream(1)

    def proxy_clear_route_cache(self) -> int:
        return self.ctx.clear_route_cache()

    def proxy_continue_stream(self, stream_type: int) -> int:
        return self.ctx.continue_stream(stream_type)

    def proxy_close_stream(self, stream_type: int) -> int:
        return self.ctx.close_stream(stream_type)

    def proxy_send_local_response(
        self, status: int, details_ptr: int, details_len: int, body_ptr: int, body_len: int,
        headers_ptr: int, headers_len: int, grpc_status: int,
    ) -> int:
        details = self._read(details_ptr, details_len)
        body = self._read(body_ptr, body_len)
        raw_headers = self._read(headers_ptr, headers_len)
        if details is None or body is None or raw_headers is None:
            return INVALID_MEMORY_ACCESS
        try:
            headers = decode_pairs(raw_headers)
        except PairsError:
            return BAD_ARGUMENT
        # grpc_status arrives masked to u32: -1 (and anything above 16) means none.
        grpc = grpc_status if grpc_status <= GRPC_STATUS_MAX else None
        return self.ctx.send_local_response(status, details.decode("utf-8", "replace"), body, headers, grpc)

    def proxy_get_status(self, code_ptr: int, msg_ptr_ptr: int, msg_size_ptr: int) -> int:
        code, message = self.ctx.root.status
        if self._write_u32(code_ptr, code) != OK:
            return INVALID_MEMORY_ACCESS
        return self.vm.copy_out(message, msg_ptr_ptr, msg_size_ptr)

    # -- callouts ----------------------------------------------------------------------
    def proxy_http_call(
        self, upstream_ptr: int, upstream_len: int, hdrs_ptr: int, hdrs_len: int, body_ptr: int,
        body_len: int, trls_ptr: int, trls_len: int, timeout_ms: int, token_ptr: int,
    ) -> int:
        upstream = self._read(upstream_ptr, upstream_len)
        raw_headers = self._read(hdrs_ptr, hdrs_len)
        body = self._read(body_ptr, body_len)
        raw_trailers = self._read(trls_ptr, trls_len)
        if upstream is None or raw_headers is None or body is None or raw_trailers is None:
            return INVALID_MEMORY_ACCESS
        try:
            headers = HeaderMap(decode_pairs(raw_headers))
            trailers = HeaderMap(decode_pairs(raw_trailers))
        except PairsError:
            return BAD_ARGUMENT
        if headers.get(b":method") is None or headers.get(b":path") is None:
            return BAD_ARGUMENT
        if headers.get(b":authority") is None and headers.get(b"host") is None:
            return BAD_ARGUMENT
        token = self.vm.dispatch_http_call(
            self.ctx.root, upstream.decode("utf-8", "replace"), headers, body, trailers, timeout_ms
        )
        if token is None:
            return BAD_ARGUMENT  # no caller, or an unknown cluster
        return self._write_u32(token_ptr, token)

    def _unimplemented(self, *_args: int) -> int:
        return UNIMPLEMENTED

    # -- shared data and queues ------------------------------------------------------------
    def proxy_get_shared_data(self, key_ptr: int, key_len: int, val_ptr_ptr: int, val_len_ptr: int,
                              cas_ptr: int) -> int:
        key = self._read(key_ptr, key_len)
        if key is None:
            return INVALID_MEMORY_ACCESS
        entry = self.vm.services.shared_data.get(self.vm.vm_id, key)
        if entry is None:
            return NOT_FOUND
        value, cas = entry
        if self._write_u32(cas_ptr, cas) != OK:
            return INVALID_MEMORY_ACCESS
        return self.vm.copy_out(value, val_ptr_ptr, val_len_ptr)

    def proxy_set_shared_data(self, key_ptr: int, key_len: int, val_ptr: int, val_len: int, cas: int) -> int:
        key = self._read(key_ptr, key_len)
        value = self._read(val_ptr, val_len)
        if key is None or value is None:
            return INVALID_MEMORY_ACCESS
        return self.vm.services.shared_data.set(self.vm.vm_id, key, value, cas)

    def proxy_register_shared_queue(self, name_ptr: int, name_len: int, token_ptr: int) -> int:
        name = self._read(name_ptr, name_len)
        if name is None:
            return INVALID_MEMORY_ACCESS
        token = self.vm.register_queue(self.ctx.root, name.decode("utf-8", "replace"))
        return self._write_u32(token_ptr, token)

    def proxy_resolve_shared_queue(self, vm_ptr: int, vm_len: int, name_ptr: int, name_len: int,
                                   token_ptr: int) -> int:
        vm_id = self._read(vm_ptr, vm_len)
        name = self._read(name_ptr, name_len)
        if vm_id is None or name is None:
            return INVALID_MEMORY_ACCESS
        token = self.vm.services.shared_queues.resolve(
            vm_id.decode("utf-8", "replace") or self.vm.vm_id, name.decode("utf-8", "replace")
        )
        if token is None:
            return NOT_FOUND
        return self._write_u32(token_ptr, token)

    def proxy_enqueue_shared_queue(self, token: int, val_ptr: int, val_len: int) -> int:
        value = self._read(val_ptr, val_len)
        if value is None:
            return INVALID_MEMORY_ACCESS
        return self.vm.services.shared_queues.enqueue(token, value)

    def proxy_dequeue_shared_queue(self, token: int, ptr_ptr: int, size_ptr: int) -> int:
        status, value = self.vm.services.shared_queues.dequeue(token)
        if status != OK:
            return status
        return self.vm.copy_out(value, ptr_ptr, size_ptr)

    # -- metrics ----------------------------------------------------------------------
    def proxy_define_metric(self, metric_type: int, name_ptr: int, name_len: int, id_ptr: int) -> int:
        name = self._read(name_ptr, name_len)
        if name is None:
            return INVALID_MEMORY_ACCESS
        status, metric_id = self.vm.services.metrics.define(metric_type, name.decode("utf-8", "replace"))
        if status != OK:
            return status
        return self._write_u32(id_ptr, metric_id)

    def proxy_increment_metric(self, metric_id: int, delta: int) -> int:
        return self.vm.services.metrics.increment(metric_id, delta)

    def proxy_record_metric(self, metric_id: int, value: int) -> int:
        return self.vm.services.metrics.record(metric_id, value)

    def proxy_get_metric(self, metric_id: int, value_ptr: int) -> int:
        status, value = self.vm.services.metrics.get(metric_id)
        if status != OK:
            return status
        return OK if self.vm.instance.write_u64(value_ptr, value) else INVALID_MEMORY_ACCESS

    # -- properties ----------------------------------------------------------------------
    def proxy_get_property(self, path_ptr: int, path_len: int, ptr_ptr: int, size_ptr: int) -> int:
        raw = self._read(path_ptr, path_len)
        if raw is None:
            return INVALID_MEMORY_ACCESS
        value = get_property(self.ctx.property_source(), decode_property_path(raw))
        if value is None:
            return NOT_FOUND
        return self.vm.copy_out(value, ptr_ptr, size_ptr)

    def proxy_set_property(self, path_ptr: int, path_len: int, val_ptr: int, val_len: int) -> int:
        raw = self._read(path_ptr, path_len)
        value = self._read(val_ptr, val_len)
        if raw is None or value is None:
            return INVALID_MEMORY_ACCESS
        stored = set_property(self.ctx.property_source(), decode_property_path(raw), value)
        return OK if stored else BAD_ARGUMENT

    # -- contexts and foreign functions ---------------------------------------------------
    def proxy_set_effective_context(self, context_id: int) -> int:
        return OK if self.vm.set_effective_context(context_id) else BAD_ARGUMENT

    def proxy_done(self) -> int:
        return OK if self.vm.root_done(self.ctx.root) else NOT_FOUND

    def proxy_call_foreign_function(self, name_ptr: int, name_len: int, args_ptr: int, args_len: int,
                                    ptr_ptr: int, size_ptr: int) -> int:
        name = self._read(name_ptr, name_len)
        args = self._read(args_ptr, args_len)
        if name is None or args is None:
            return INVALID_MEMORY_ACCESS
        function = FOREIGN_FUNCTIONS.get(name.decode("utf-8", "replace"))
        if function is None:
            return NOT_FOUND
        status, result = function(args)
        if status != OK:
            return status
        return self.vm.copy_out(result, ptr_ptr, size_ptr)

    # -- Higress extras with no backend here ------------------------------------------------
    def proxy_get_upstream_hosts(self, _ptr_ptr: int, _size_ptr: int) -> int:
        return NOT_FOUND

    def envoy_resolve_dns(self, _addr_ptr: int, _addr_len: int, _token_ptr: int) -> int:
        return UNIMPLEMENTED

    # -- old emscripten C++ SDK builds --------------------------------------------------------
    def pthread_equal(self, left: int, right: int) -> int:
        return 1 if left == right else 0

    def emscripten_notify_memory_growth(self, _index: int) -> None:
        return None

    # -- registration --------------------------------------------------------------------
    def host_funcs(self) -> list[HostFunc]:
        i = "i"
        table: list[tuple[str, FuncSig, Callable[..., int | None]]] = [
            ("proxy_log", sig(i * 3, i), self.proxy_log),
            ("proxy_get_log_level", sig(i, i), self.proxy_get_log_level),
            ("proxy_get_current_time_nanoseconds", sig(i, i), self.proxy_get_current_time_nanoseconds),
            ("proxy_set_tick_period_milliseconds", sig(i, i), self.proxy_set_tick_period_milliseconds),
            ("proxy_get_configuration", sig(i * 2, i), self.proxy_get_configuration),
            ("proxy_get_buffer_bytes", sig(i * 5, i), self.proxy_get_buffer_bytes),
            ("proxy_get_buffer_status", sig(i * 3, i), self.proxy_get_buffer_status),
            ("proxy_set_buffer_bytes", sig(i * 5, i), self.proxy_set_buffer_bytes),
            ("proxy_get_header_map_size", sig(i * 2, i), self.proxy_get_header_map_size),
            ("proxy_get_header_map_pairs", sig(i * 3, i), self.proxy_get_header_map_pairs),
            ("proxy_set_header_map_pairs", sig(i * 3, i), self.proxy_set_header_map_pairs),
            ("proxy_get_header_map_value", sig(i * 5, i), self.proxy_get_header_map_value),
            ("proxy_add_header_map_value", sig(i * 5, i), self.proxy_add_header_map_value),
            ("proxy_replace_header_map_value", sig(i * 5, i), self.proxy_replace_header_map_value),
            ("proxy_remove_header_map_value", sig(i * 3, i), self.proxy_remove_header_map_value),
            ("proxy_continue_request", sig("", i), self.proxy_continue_request),
            ("proxy_continue_response", sig("", i), self.proxy_continue_response),
            ("proxy_clear_route_cache", sig("", i), self.proxy_clear_route_cache),
            ("proxy_continue_stream", sig(i, i), self.proxy_continue_stream),
            ("proxy_close_stream", sig(i, i), self.proxy_close_stream),
            ("proxy_send_local_response", sig(i * 8, i), self.proxy_send_local_response),
            ("proxy_get_status", sig(i * 3, i), self.proxy_get_status),
            ("proxy_http_call", sig(i * 10, i), self.proxy_http_call),
            # gRPC needs an embedder backend; none is wired: UNIMPLEMENTED, cleanly.
            ("proxy_grpc_call", sig(i * 12, i), self._unimplemented),
            ("proxy_grpc_stream", sig(i * 9, i), self._unimplemented),
            ("proxy_grpc_send", sig(i * 4, i), self._unimplemented),
            ("proxy_grpc_cancel", sig(i, i), self._unimplemented),
            ("proxy_grpc_close", sig(i, i), self._unimplemented),
            ("proxy_get_shared_data", sig(i * 5, i), self.proxy_get_shared_data),
            ("proxy_set_shared_data", sig(i * 5, i), self.proxy_set_shared_data),
            ("proxy_register_shared_queue", sig(i * 3, i), self.proxy_register_shared_queue),
            ("proxy_resolve_shared_queue", sig(i * 5, i), self.proxy_resolve_shared_queue),
            ("proxy_enqueue_shared_queue", sig(i * 3, i), self.proxy_enqueue_shared_queue),
            ("proxy_dequeue_shared_queue", sig(i * 3, i), self.proxy_dequeue_shared_queue),
            ("proxy_define_metric", sig(i * 4, i), self.proxy_define_metric),
            ("proxy_increment_metric", sig("iI", i), self.proxy_increment_metric),
            ("proxy_record_metric", sig("iI", i), self.proxy_record_metric),
            ("proxy_get_metric", sig(i * 2, i), self.proxy_get_metric),
            ("proxy_get_property", sig(i * 4, i), self.proxy_get_property),
            ("proxy_set_property", sig(i * 4, i), self.proxy_set_property),
            ("proxy_set_effective_context", sig(i, i), self.proxy_set_effective_context),
            ("proxy_done", sig("", i), self.proxy_done),
            ("proxy_call_foreign_function", sig(i * 6, i), self.proxy_call_foreign_function),
            # Higress 0_2_100: Redis and upstream overrides need a backend this host does not have.
            ("proxy_redis_init", sig(i * 7, i), self._unimplemented),
            ("proxy_redis_call", sig(i * 5, i), self._unimplemented),
            ("proxy_inject_encoded_data_to_filter_chain", sig(i * 3, i), self._unimplemented),
            ("proxy_get_upstream_hosts", sig(i * 2, i), self.proxy_get_upstream_hosts),
            ("proxy_set_upstream_override_host", sig(i * 2, i), self._unimplemented),
            ("envoy_resolve_dns", sig(i * 3, i), self.envoy_resolve_dns),
            ("pthread_equal", sig(i * 2, i), self.pthread_equal),
            ("emscripten_notify_memory_growth", sig(i, ""), self.emscripten_notify_memory_growth),
        ]
        return [HostFunc("env", name, signature, impl) for name, signature, impl in table]


def deliver_pairs_count(response: HttpCallResponse) -> tuple[int, int, int]:
    """(n_headers, body_size, n_trailers) as proxy_on_http_call_response receives them."""
    return len(response.headers), len(response.body), len(response.trailers)

