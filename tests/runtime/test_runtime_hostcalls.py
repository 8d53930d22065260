"""Every host-call family, driven by one WAT plugin through a filter (headers, bodies,
properties, shared data/queues, metrics, ticks, http_call, local reply, foreign functions, WASI)."""

from __future__ import annotations

import struct
import zlib

import pytest
from runtime_support import (
    RET_PTR,
    FakeCallbacks,
    LogRecorder,
    ManualScheduler,
    RecordingHttpCaller,
    build_module,
    request,
    slot,
)

from wasmesh.http.filter import FilterDataStatus, FilterHeadersStatus, StreamInfo
from wasmesh.http.headers import HeaderMap
from wasmesh.runtime import HttpCallResponse, PluginSpec, Runtime
from wasmesh.runtime.pairs import encode_pairs
from wasmesh.runtime.plugin import WasmHttpFilter, WasmPlugin


class Strings:
    """Places byte strings in guest memory and renders ``(i32.const ptr) (i32.const len)``."""

    def __init__(self, start: int = 0x1000) -> None:
        self.next = start
        self.data: dict[int, bytes] = {}
        self.where: dict[str, tuple[int, int]] = {}

    def add(self, name: str, value: bytes) -> None:
        self.where[name] = (self.next, len(value))
        self.data[self.next] = value
        self.next += (len(value) + 15) // 16 * 16 + 16

    def __getitem__(self, name: str) -> str:
        ptr, size = self.where[name]
        return f"(i32.const {ptr}) (i32.const {size})"


S = Strings()
for key, raw in {
    "path_prop": b"request\0path", "plugin_name": b"plugin_name", "node_id": b"xds\0node\0id",
    "legacy_node_meta": b"node\0metadata\0ISTIO_VERSION", "conn_id": b"connection_id",
    "myprop": b"myprop", "v1": b"v1", "k": b"k", "val": b"val",
    "metric": b"hits_reporter=wasm", "queue": b"q", "item": b"item",
    "auth": b"auth", "nope": b"nope",
    "call_headers": encode_pairs([(b":method", b"GET"), (b":path", b"/check"), (b":authority", b"auth")]),
    "bad_headers": encode_pairs([(b":method", b"GET")]), "call_body": b"ping",
    "compress": b"compress", "uncompress": b"uncompress", "nothing": b"nothing", "text": b"hello hello hello",
    "status": b":status", "details": b"denied", "reply_body": b"nope",
    "reply_headers": encode_pairs([(b"x-reply", b"1")]), "pre": b"PRE", "post": b"POST",
    "server": b"server", "wasm": b"wasm", "x-remove": b"x-remove", "tick": b"tick", "log": b"on_log",
}.items():
    S.add(key, raw)

R = f"(i32.const {RET_PTR}) (i32.const {RET_PTR + 4})"
RET_VALUE = f"(i32.load (i32.const {RET_PTR})) (i32.load (i32.const {RET_PTR + 4}))"
LOG_RET = f"(drop (call $proxy_log (i32.const 2) {RET_VALUE}))"
WASI = """
(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
"""

BODY = f"""
(global $metric (mut i32) (i32.const 0))
(global $queue (mut i32) (i32.const 0))
(global $stream (mut i32) (i32.const 0))
(func (export "proxy_on_context_create") (param i32 i32))
(func (export "proxy_on_vm_start") (param $root i32) (param $size i32) (result i32)
  (call $save (i32.const 10) (call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (i32.const -1) {R}))
  {LOG_RET}
  ;; stdout through WASI: iovec at 0x400 -> "tick" text, nwritten at 0x410
  (i32.store (i32.const 0x400) (i32.const {S.where["tick"][0]}))
  (i32.store (i32.const 0x404) (i32.const {S.where["tick"][1]}))
  (call $save (i32.const 11) (call $fd_write (i32.const 1) (i32.const 0x400) (i32.const 1) (i32.const 0x410)))
  (call $save (i32.const 12) (call $env_sizes (i32.const 0x420) (i32.const 0x424)))
  (call $save (i32.const 13) (i32.load (i32.const 0x420)))
  (i32.const 1))
(func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
  (call $save (i32.const 14) (local.get $size))
  (drop (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) {R}))
  {LOG_RET}
  (drop (call $proxy_define_metric (i32.const 0) {S["metric"]} (i32.const 0x300)))
  (global.set $metric (i32.load (i32.const 0x300)))
  (drop (call $proxy_register_shared_queue {S["queue"]} (i32.const 0x304)))
  (global.set $queue (i32.load (i32.const 0x304)))
  (drop (call $proxy_set_tick_period_milliseconds (i32.const 100)))
  (i32.const 1))
(func (export "proxy_on_tick") (param $root i32)
  (drop (call $proxy_increment_metric (global.get $metric) (i64.const 1)))
  (drop (call $proxy_log (i32.const 2) {S["tick"]})))
(func (export "proxy_on_queue_ready") (param $root i32) (param $token i32)
  (call $save (i32.const 15) (call $proxy_dequeue_shared_queue (local.get $token) {R}))
  {LOG_RET}
  (call $save (i32.const 16) (call $proxy_dequeue_shared_queue (local.get $token) {R})))
(func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
  (global.set $stream (local.get $ctx))
  (call $save (i32.const 0) (call $proxy_get_property {S["path_prop"]} {R}))
  {LOG_RET}
  (drop (call $proxy_get_property {S["plugin_name"]} {R}))
  {LOG_RET}
  (drop (call $proxy_get_property {S["node_id"]} {R}))
  {LOG_RET}
  (drop (call $proxy_get_property {S["legacy_node_meta"]} {R}))
  {LOG_RET}
  (call $save (i32.const 1) (call $proxy_get_property {S["conn_id"]} {R}))
  (call $save (i32.const 2) (i32.load (i32.load (i32.const {RET_PTR}))))
  (call $save (i32.const 3) (call $proxy_set_property {S["myprop"]} {S["v1"]}))
  (drop (call $proxy_get_property {S["myprop"]} {R}))
  {LOG_RET}
  (call $save (i32.const 4) (call $proxy_set_shared_data {S["k"]} {S["val"]} (i32.const 0)))
  (call $save (i32.const 5) (call $proxy_get_shared_data {S["k"]} {R} (i32.const 0x308)))
  (call $save (i32.const 6) (call $proxy_set_shared_data {S["k"]} {S["val"]} (i32.const 0x7fff0000)))
  (call $save (i32.const 7) (call $proxy_set_shared_data {S["k"]} {S["val"]} (i32.load (i32.const 0x308))))
  (call $save (i32.const 8) (call $proxy_enqueue_shared_queue (global.get $queue) {S["item"]}))
  (call $save (i32.const 9) (call $proxy_http_call {S["nope"]} {S["call_headers"]} {S["call_body"]}
      (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 0x30c)))
  (call $save (i32.const 17) (call $proxy_http_call {S["auth"]} {S["bad_headers"]} {S["call_body"]}
      (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 0x30c)))
  (call $save (i32.const 18) (call $proxy_http_call {S["auth"]} {S["call_headers"]} {S["call_body"]}
      (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 0x30c)))
  (call $save (i32.const 19) (call $proxy_call_foreign_function {S["compress"]} {S["text"]} {R}))
  (call $save (i32.const 20) (call $proxy_call_foreign_function {S["uncompress"]} {RET_VALUE} {R}))
  {LOG_RET}
  (call $save (i32.const 21) (call $proxy_call_foreign_function {S["nothing"]} {S["text"]} {R}))
  (call $save (i32.const 22) (call $proxy_grpc_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0x310)))
  (call $save (i32.const 23) (call $proxy_get_header_map_pairs (i32.const 0) {R}))
  (call $save (i32.const 24) (i32.load (i32.load (i32.const {RET_PTR}))))
  (i32.const 1))
(func (export "proxy_on_http_call_response") (param $root i32) (param $token i32) (param $nh i32)
    (param $body i32) (param $nt i32)
  (call $save (i32.const 25) (local.get $nh))
  (call $save (i32.const 26) (local.get $body))
  (call $save (i32.const 27) (call $proxy_set_effective_context (global.get $stream)))
  (if (i32.eqz (local.get $nh)) (then
    (call $save (i32.const 28) (call $proxy_get_status (i32.const 0x314) {R}))
    (call $save (i32.const 29) (i32.load (i32.const 0x314)))
    {LOG_RET}
    (drop (call $proxy_continue_stream (i32.const 0)))
    (return)))
  (drop (call $proxy_get_header_map_value (i32.const 6) {S["status"]} {R}))
  {LOG_RET}
  (drop (call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (i32.const -1) {R}))
  {LOG_RET}
  (drop (call $proxy_send_local_response (i32.const 403) {S["details"]} {S["reply_body"]} {S["reply_headers"]}
      (i32.const -1))))
(func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
  (call $save (i32.const 30) (local.get $size))
  (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
  (drop (call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const -1) {R}))
  {LOG_RET}
  (call $save (i32.const 31)
      (call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const 0) {S["pre"]}))
  (call $save (i32.const 32) (call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0x7fffffff) (i32.const 0)
      {S["post"]}))
  (call $save (i32.const 33)
      (call $proxy_set_buffer_bytes (i32.const 0) (i32.const 2) (i32.const 1) {S["post"]}))
  (i32.const 0))
(func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
  (drop (call $proxy_replace_header_map_value (i32.const 2) {S["server"]} {S["wasm"]}))
  (drop (call $proxy_remove_header_map_value (i32.const 2) {S["x-remove"]}))
  (i32.const 0))
(func (export "proxy_on_log") (param $ctx i32) (drop (call $proxy_log (i32.const 3) {S["log"]})))
(func (export "proxy_on_done") (param $ctx i32) (result i32) (i32.const 1))
(func (export "proxy_on_delete") (param $ctx i32) (call $save (i32.const 34) (local.get $ctx)))
"""

MODULE = build_module(BODY, abi="0_2_1", data=S.data, wasi_imports=WASI)


@pytest.fixture
def plugin(runtime: Runtime) -> WasmPlugin:
    spec = PluginSpec(name="sink", module=MODULE, root_id="r", vm_id="vm-hostcalls", vm_config=b"vmcfg",
                      configuration=b'{"a":1}', env={"A": "1", "B": "2"})
    return runtime.load_plugin(spec)


def start_stream(plugin: WasmPlugin) -> tuple[WasmHttpFilter, FakeCallbacks, HeaderMap]:
    filt = plugin.create_filter()
    assert isinstance(filt, WasmHttpFilter)
    callbacks = FakeCallbacks(stream_info=StreamInfo(connection_id=42))
    filt.set_callbacks(callbacks)
    headers = request()
    return filt, callbacks, headers


def test_startup_reads_configuration_and_wasi(plugin: WasmPlugin, logs: LogRecorder) -> None:
    assert slot(plugin, 10) == 0
    assert logs.messages()[:3] == ["vmcfg", "tick", '{"a":1}']
    assert logs.lines[1][1] == 2  # stdout logs at INFO
    assert slot(plugin, 11) == 0 and slot(plugin, 12) == 0 and slot(plugin, 13) == 2
    assert slot(plugin, 14) == len(b'{"a":1}')


def test_request_path_exercises_every_family(
    plugin: WasmPlugin, runtime: Runtime, logs: LogRecorder, http_caller: RecordingHttpCaller,
    scheduler: ManualScheduler,
) -> None:
    filt, callbacks, headers = start_stream(plugin)
    logs.lines.clear()
    status = filt.decode_headers(headers, False)
    assert status == FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK  # Pause on headers (0.2.1)
    messages = logs.messages()
    assert messages[:5] == ["/p?q=1", "sink", "node-1", "1.24", "v1"]
    assert slot(plugin, 0) == 0 and slot(plugin, 1) == 0 and slot(plugin, 2) == 42  # connection_id u64 LE
    assert slot(plugin, 3) == 0
    # shared data: set, get, CAS mismatch, CAS match
    assert (slot(plugin, 4), slot(plugin, 5), slot(plugin, 6), slot(plugin, 7)) == (0, 0, 8, 0)
    assert runtime.shared_data.get("vm-hostcalls", b"k") is not None
    assert slot(plugin, 8) == 0  # enqueued
    assert slot(plugin, 9) == 2 and slot(plugin, 17) == 2 and slot(plugin, 18) == 0  # http_call statuses
    assert len(http_caller.calls) == 1 and http_caller.calls[0].headers.get(b":path") == b"/check"
    assert http_caller.calls[0].body == b"ping" and http_caller.calls[0].timeout_ms == 500
    assert (slot(plugin, 19), slot(plugin, 20), slot(plugin, 21), slot(plugin, 22)) == (0, 0, 1, 12)
    assert messages[5] == "hello hello hello"
    assert slot(plugin, 23) == 0 and slot(plugin, 24) == 4  # header pairs: count first
    # the queue notification and the tick come from the scheduler
    scheduler.advance(0.15)
    assert slot(plugin, 15) == 0 and slot(plugin, 16) == 7  # then EMPTY
    assert "item" in logs.messages() and "tick" in logs.messages()
    assert runtime.metrics.value_by_name("hits_reporter=wasm") == 1
    assert 'wasmcustom_hits{reporter="wasm"} 1' in runtime.metrics.render_prometheus()
    # the callout answer: delivered on the root context, local reply from the stream context
    http_caller.calls[0].on_response(
        HttpCallResponse(HeaderMap([(b":status", b"200")]), b"pong", HeaderMap())
    )
    assert (slot(plugin, 25), slot(plugin, 26), slot(plugin, 27)) == (1, 4, 0)
    assert logs.messages()[-2:] == ["200", "pong"]
    assert len(callbacks.local_replies) == 1
    reply = callbacks.local_replies[0]
    assert (reply.status, reply.body, reply.details, reply.headers, reply.grpc_status) == (
        403, b"nope", "denied", [(b"x-reply", b"1")], None)
    filt.on_log()
    filt.on_destroy()
    assert logs.messages()[-1] == "on_log"
    assert slot(plugin, 34) != 0  # on_delete ran


def test_http_call_reset_delivers_zeroes_and_broken_connection(
    plugin: WasmPlugin, http_caller: RecordingHttpCaller, logs: LogRecorder
) -> None:
    filt, callbacks, headers = start_stream(plugin)
    filt.decode_headers(headers, False)
    http_caller.calls[-1].on_response(None)
    assert (slot(plugin, 25), slot(plugin, 26)) == (0, 0)
    assert (slot(plugin, 28), slot(plugin, 29)) == (0, 11)
    assert logs.messages()[-1] == "reset"
    assert callbacks.continued_decoding == 1  # continue from an async callback resumes the stream


def test_bodies_and_response_headers(plugin: WasmPlugin, logs: LogRecorder) -> None:
    filt, callbacks, headers = start_stream(plugin)
    filt.decode_headers(headers, False)
    first = bytearray(b"hel")
    assert filt.decode_data(first, False) == FilterDataStatus.STOP_ITERATION_AND_BUFFER
    buffered = bytearray(b"hello")
    assert filt.decode_data(buffered, True) == FilterDataStatus.CONTINUE
    assert slot(plugin, 30) == 5  # cumulative size
    assert logs.messages()[-1] == "hello"
    assert bytes(buffered) == b"PREhelloPOST"
    assert (slot(plugin, 31), slot(plugin, 32), slot(plugin, 33)) == (0, 0, 2)  # middle replace: BAD_ARGUMENT
    response = HeaderMap([(b":status", b"200"), (b"server", b"upstream"), (b"x-remove", b"1")])
    assert filt.encode_headers(response, True) == FilterHeadersStatus.CONTINUE
    assert response.pairs() == [(b":status", b"200"), (b"server", b"wasm")]


def test_compress_matches_zlib() -> None:
    from wasmesh.runtime.hostcalls import FOREIGN_FUNCTIONS

    status, out = FOREIGN_FUNCTIONS["compress"](b"abc" * 10)
    assert status == 0 and zlib.decompress(out) == b"abc" * 10
    assert FOREIGN_FUNCTIONS["uncompress"](b"not zlib")[0] == 3


def test_properties_encodings() -> None:
    from wasmesh.runtime.properties import PropertySource, get_property, set_property

    info = StreamInfo(downstream_remote_address=("10.1.2.3", 5555), response_code=200,
                      dynamic_metadata={"envoy.lb": {"canary": True}}, route_name="r1")
    src = PropertySource("p", "root", "vm", {"id": "n"}, stream_info=info, request_headers=request(
        extra=[(b"x-multi", b"a"), (b"x-multi", b"b")]))

    def get(*parts: bytes) -> bytes | None:
        return get_property(src, list(parts))

    assert get(b"source", b"address") == b"10.1.2.3:5555"
    assert get(b"source", b"port") == struct.pack("<q", 5555)
    assert get(b"response", b"code") == struct.pack("<q", 200)
    assert get(b"request", b"headers", b"x-multi") == b"a,b"
    assert get(b"request", b"url_path") == b"/p" and get(b"request", b"query") == b"q=1"
    assert get(b"metadata", b"filter_metadata", b"envoy.lb", b"canary") == b"\x01"
    assert get(b"route_name") == get(b"xds", b"route_name") == b"r1"
    assert get(b"xds", b"node") is not None and get(b"nothing") is None
    assert set_property(src, [b"a", b"b"], b"v") and get(b"a", b"b") == b"v"
    assert info.filter_state["wasm.a.b"] == b"v"
