"""The written-out paths of the hottest calls behave as the general ones: header changes read guest
memory with bounds checks, and a plugin without body/trailer callbacks leaves bodies alone."""

from __future__ import annotations

from runtime_support import RET_PTR, FakeCallbacks, build_module, request, returned_bytes, slot

from wasmesh.http.filter import FilterDataStatus, FilterHeadersStatus, FilterTrailersStatus
from wasmesh.http.headers import HeaderMap
from wasmesh.runtime import FailurePolicy, PluginSpec, Runtime
from wasmesh.runtime.abi import WasmResult
from wasmesh.runtime.plugin import WasmHttpFilter

# on_request_headers: add (or replace) a header whose key starts at $key_ptr, then record the
# result code as the value of x-result (one ASCII digit). One 64 KiB page of memory.
BODY = """
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $r i32)
    (local.set $r (call $proxy_CHANGE_header_map_value
      (i32.const 0) (i32.const KEY_PTR) (i32.const 7) (i32.const 200) (i32.const 3)))
    (i32.store8 (i32.const 400) (i32.add (i32.const 48) (local.get $r)))
    (drop (call $proxy_add_header_map_value
      (i32.const 0) (i32.const 300) (i32.const 8) (i32.const 400) (i32.const 1)))
    (i32.const 0))
"""
DATA = {100: b"x-added", 200: b"yes", 300: b"x-result"}


def load(runtime: Runtime, key_ptr: int, change: str = "add") -> WasmHttpFilter:
    body = BODY.replace("KEY_PTR", str(key_ptr)).replace("CHANGE", change)
    module = build_module(body, abi="0_2_1", data=DATA, memory_pages=1)
    spec = PluginSpec(name=f"{change}-{key_ptr}", module=module, failure_policy=FailurePolicy.FAIL_CLOSE)
    filt = runtime.load_plugin(spec).create_filter()
    assert isinstance(filt, WasmHttpFilter)
    filt.set_callbacks(FakeCallbacks())
    return filt


def result_of(headers: HeaderMap) -> WasmResult:
    value = headers.get(b"x-result")
    assert value is not None
    return WasmResult(int(value))


def test_header_change_inside_memory(runtime: Runtime) -> None:
    for change in ("add", "replace"):
        filt = load(runtime, 100, change)
        headers = request()
        assert filt.decode_headers(headers, True) == FilterHeadersStatus.CONTINUE
        assert result_of(headers) == WasmResult.OK
        assert headers.get_all(b"x-added") == [b"yes"]


def test_header_change_past_the_end_of_memory_is_refused(runtime: Runtime) -> None:
    # The key straddles the end of the single 64 KiB page, and one starts beyond it.
    for key_ptr in (65536 - 3, 65536 + 10):
        for change in ("add", "replace"):
            filt = load(runtime, key_ptr, change)
            headers = request()
            assert filt.decode_headers(headers, True) == FilterHeadersStatus.CONTINUE
            assert result_of(headers) == WasmResult.INVALID_MEMORY_ACCESS
            assert headers.get(b"x-added") is None


def test_plugin_without_body_callbacks_passes_bodies_and_trailers(runtime: Runtime) -> None:
    filt = load(runtime, 100)
    assert filt.decode_headers(request(), False) == FilterHeadersStatus.CONTINUE
    assert filt.decode_data(bytearray(b"chunk"), False) == FilterDataStatus.CONTINUE
    assert filt.decode_trailers(HeaderMap([(b"t", b"1")])) == FilterTrailersStatus.CONTINUE
    response = HeaderMap([(b":status", b"200")])
    assert filt.encode_headers(response, False) == FilterHeadersStatus.CONTINUE
    assert filt.encode_data(bytearray(b"body"), False) == FilterDataStatus.CONTINUE
    assert filt.encode_trailers(HeaderMap([(b"t", b"2")])) == FilterTrailersStatus.CONTINUE
    filt.on_log()
    filt.on_destroy()


def test_plugin_without_body_callbacks_holds_a_request_body_after_its_local_reply(runtime: Runtime) -> None:
    # Once the plugin has sent a local reply (marked directly here), later request chunks stop at
    # the plugin exactly as they do when the body callback exists (_data_status).
    filt = load(runtime, 100)
    callbacks = FakeCallbacks()
    filt.set_callbacks(callbacks)
    assert filt.decode_headers(request(), False) == FilterHeadersStatus.CONTINUE
    filt.local_reply_sent = True
    assert filt.decode_data(bytearray(b"chunk"), False) == FilterDataStatus.STOP_ITERATION_NO_BUFFER
    assert filt.decode_trailers(HeaderMap([(b"t", b"1")])) == FilterTrailersStatus.STOP_ITERATION
    filt.on_log()
    filt.on_destroy()


# A value handed to the plugin (copy_out): written with its address in one call, or not at all.
COPY_OUT_BODY = """
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $save (i32.const 0) (call $proxy_get_header_map_value
      (i32.const 0) (i32.const 100) (i32.const 5) (i32.const PTR_PTR) (i32.const RET_SIZE)))
    (i32.const 0))
"""


def test_value_and_its_address_are_written_together(runtime: Runtime) -> None:
    for ptr_ptr, expected in ((RET_PTR, WasmResult.OK), (65536 - 2, WasmResult.INVALID_MEMORY_ACCESS)):
        body = COPY_OUT_BODY.replace("PTR_PTR", str(ptr_ptr)).replace("RET_SIZE", str(RET_PTR + 4))
        module = build_module(body, abi="0_2_1", data={100: b":path"}, memory_pages=1)
        plugin = runtime.load_plugin(PluginSpec(name=f"copy-out-{ptr_ptr}", module=module))
        filt = plugin.create_filter()
        assert isinstance(filt, WasmHttpFilter)
        filt.set_callbacks(FakeCallbacks())
        filt.decode_headers(request(b"/copied"), True)
        assert slot(plugin, 0) == expected
        if expected == WasmResult.OK:
            assert returned_bytes(plugin.vm) == b"/copied"
        else:  # nothing was written: not even the size
            assert plugin.vm.instance.read_u32(RET_PTR + 4) == 0
        filt.on_log()
        filt.on_destroy()
