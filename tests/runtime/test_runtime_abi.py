"""ABI detection, start-up refusals and callback arity/status conversion, on small WAT modules."""

from __future__ import annotations

import pytest
from runtime_support import RET_PTR, FakeCallbacks, build_module, request, returned_bytes, slot

from wasmesh.http.filter import FilterHeadersStatus
from wasmesh.runtime import PluginLoadError, PluginSpec, Runtime
from wasmesh.runtime.plugin import WasmHttpFilter

ROOT_CALLBACKS = """
(func (export "proxy_on_context_create") (param i32 i32))
(func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
"""

DATA = {0x1000: b"x-added", 0x1010: b"yes", 0x1020: b"x-missing", 0x1030: b":path"}

HEADER_BODY = f"""
  (call $save (i32.const 0) (local.get $n))
  (call $save (i32.const 2) (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x1020) (i32.const 9)
      (i32.const {RET_PTR}) (i32.const {RET_PTR + 4})))
  (call $save (i32.const 3) (call $proxy_add_header_map_value (i32.const 0) (i32.const 0x1000) (i32.const 7)
      (i32.const 0x1010) (i32.const 3)))
  (call $save (i32.const 4) (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x1030) (i32.const 5)
      (i32.const {RET_PTR}) (i32.const {RET_PTR + 4})))
"""


def header_module(abi: str, three_params: bool, result: int = 0) -> bytes:
    params = "(param $ctx i32) (param $n i32)" + (" (param $eos i32)" if three_params else "")
    eos = "(call $save (i32.const 1) (i32.add (local.get $eos) (i32.const 10)))" if three_params else ""
    body = f"""{ROOT_CALLBACKS}
(func (export "proxy_on_request_headers") {params} (result i32)
  {HEADER_BODY} {eos}
  (i32.const {result}))
"""
    return build_module(body, abi=abi, data=DATA)


def drive_headers(runtime: Runtime, module: bytes) -> tuple[WasmHttpFilter, FilterHeadersStatus]:
    factory = runtime.load_plugin(PluginSpec(name="hdr", module=module))
    filt = factory.create_filter()
    assert isinstance(filt, WasmHttpFilter)
    filt.set_callbacks(FakeCallbacks())
    headers = request()
    status = filt.decode_headers(headers, True)
    assert headers.get(b"x-added") == b"yes"
    return filt, status


@pytest.mark.parametrize(
    ("abi", "three_params", "missing_status"),
    [("0_1_0", False, 0), ("0_1_0", True, 0), ("0_2_0", True, 1), ("0_2_1", True, 1), ("0_2_100", True, 1)],
)
def test_header_callback_arity_and_missing_value_status(
    runtime: Runtime, abi: str, three_params: bool, missing_status: int
) -> None:
    filt, status = drive_headers(runtime, header_module(abi, three_params))
    plugin = filt._plugin
    assert status == FilterHeadersStatus.CONTINUE
    assert slot(plugin, 0) == 4  # number of headers
    if three_params:
        assert slot(plugin, 1) == 11  # end_of_stream=1, offset so 0 is distinguishable from "not written"
    assert slot(plugin, 2) == missing_status  # 0.1.0: OK (empty); 0.2.x: NOT_FOUND
    assert slot(plugin, 3) == 0
    assert slot(plugin, 4) == 0
    assert returned_bytes(plugin.vm) == b"/p?q=1"


@pytest.mark.parametrize(
    ("abi", "result", "expected"),
    [
        ("0_2_0", 1, FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK),
        ("0_2_100", 1, FilterHeadersStatus.STOP_ITERATION),
        ("0_2_1", 3, FilterHeadersStatus.STOP_ALL_ITERATION_AND_BUFFER),
        ("0_2_1", 9, FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK),
    ],
)
def test_header_status_conversion(
    runtime: Runtime, abi: str, result: int, expected: FilterHeadersStatus
) -> None:
    _, status = drive_headers(runtime, header_module(abi, True, result))
    assert status == expected


def test_non_wasm_bytes_refused(runtime: Runtime) -> None:
    with pytest.raises(PluginLoadError, match=r"^plugin junk: module: not a WebAssembly module"):
        runtime.load_plugin(PluginSpec(name="junk", module=b"GIF89a not wasm"))


def test_invalid_wasm_refused_in_one_line(runtime: Runtime) -> None:
    with pytest.raises(PluginLoadError) as info:
        runtime.load_plugin(PluginSpec(name="bad", module=b"\0asm\x01\0\0\0\xff\xff"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("plugin bad: module: invalid WebAssembly")


def test_missing_abi_marker_names_what_was_found(runtime: Runtime) -> None:
    module = build_module(ROOT_CALLBACKS, abi="")
    with pytest.raises(PluginLoadError) as info:
        runtime.load_plugin(PluginSpec(name="noabi", module=module))
    message = str(info.value)
    assert message.startswith("plugin noabi: module has no proxy_abi_version_* export (found: ")
    assert "proxy_on_configure" in message and "\n" not in message


def test_unknown_abi_version_refused(runtime: Runtime) -> None:
    module = build_module(ROOT_CALLBACKS, abi="0_3_0")
    expected = "unsupported Proxy-Wasm ABI version export proxy_abi_version_0_3_0"
    with pytest.raises(PluginLoadError, match=expected):
        runtime.load_plugin(PluginSpec(name="future", module=module))


def test_trap_in_initialize_is_a_load_error(runtime: Runtime) -> None:
    module = build_module(ROOT_CALLBACKS + '(func (export "_initialize") unreachable)')
    with pytest.raises(PluginLoadError, match=r"^plugin boom: VM start-up failed \(trap\): .*unreachable"):
        runtime.load_plugin(PluginSpec(name="boom", module=module))


def test_on_configure_false_is_refused(runtime: Runtime) -> None:
    body = """
(func (export "proxy_on_context_create") (param i32 i32))
(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0))
"""
    with pytest.raises(PluginLoadError) as info:
        runtime.load_plugin(PluginSpec(name="picky", module=build_module(body)))
    assert str(info.value) == "plugin picky: on_configure returned false"


def test_module_without_allocator_refused(runtime: Runtime) -> None:
    module = build_module(ROOT_CALLBACKS, allocator="not_an_allocator")
    with pytest.raises(PluginLoadError, match="neither malloc nor proxy_on_memory_allocate"):
        runtime.load_plugin(PluginSpec(name="noalloc", module=module))


def test_start_runs_for_command_modules_and_exit_zero_is_success(runtime: Runtime) -> None:
    wasi = '(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))'
    body = ROOT_CALLBACKS + """(func (export "_start")
        (call $save (i32.const 0) (i32.const 7)) (call $exit (i32.const 0)))"""
    factory = runtime.load_plugin(PluginSpec(name="cmd", module=build_module(body, wasi_imports=wasi)))
    assert slot(factory, 0) == 7


def test_start_exit_nonzero_is_a_load_error(runtime: Runtime) -> None:
    wasi = '(import "wasi_unstable" "proc_exit" (func $exit (param i32)))'
    body = ROOT_CALLBACKS + '(func (export "_start") (call $exit (i32.const 3)))'
    with pytest.raises(PluginLoadError, match="exited with code 3"):
        runtime.load_plugin(PluginSpec(name="cmd", module=build_module(body, wasi_imports=wasi)))


def test_plugins_with_same_vm_key_share_one_vm(runtime: Runtime) -> None:
    module = header_module("0_2_0", True)
    first = runtime.load_plugin(PluginSpec(name="a", module=module, root_id="a", vm_id="shared"))
    second = runtime.load_plugin(PluginSpec(name="b", module=module, root_id="b", vm_id="shared"))
    other = runtime.load_plugin(PluginSpec(name="c", module=module, root_id="c", vm_id="other"))
    assert first.vm is second.vm and first.vm is not other.vm
    assert first.root is not None and second.root is not None and first.root.id != second.root.id
    runtime.unload_plugin(first)
    assert second.create_filter() is not None
