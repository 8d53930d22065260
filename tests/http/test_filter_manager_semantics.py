"""FilterManager: Envoy's iteration, buffering, local-reply and lifecycle semantics, with Python filters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wasmesh.http.filter import (
    FilterCallbacks,
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
    HttpFilter,
    StreamInfo,
)
from wasmesh.http.filter_manager import FilterManager
from wasmesh.http.headers import HeaderMap

H = FilterHeadersStatus
D = FilterDataStatus
T = FilterTrailersStatus


@dataclass
class RecordingSink:
    """Records what comes out of the chain, in order."""

    events: list[tuple[Any, ...]] = field(default_factory=list)

    def upstream_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.events.append(("up_headers", headers.copy(), end_stream))

    def upstream_request_data(self, data: bytes, end_stream: bool) -> None:
        self.events.append(("up_data", data, end_stream))

    def upstream_request_trailers(self, trailers: HeaderMap) -> None:
        self.events.append(("up_trailers", trailers.copy()))

    def downstream_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.events.append(("down_headers", headers.copy(), end_stream))

    def downstream_response_data(self, data: bytes, end_stream: bool) -> None:
        self.events.append(("down_data", data, end_stream))

    def downstream_response_trailers(self, trailers: HeaderMap) -> None:
        self.events.append(("down_trailers", trailers.copy()))

    def reset(self, details: str) -> None:
        self.events.append(("reset", details))

    def pause_request_source(self) -> None:
        self.events.append(("pause",))

    def resume_request_source(self) -> None:
        self.events.append(("resume",))

    def kinds(self) -> list[str]:
        return [str(e[0]) for e in self.events]

    def upstream_body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "up_data")

    def downstream_body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "down_data")

    def first(self, kind: str) -> tuple[Any, ...]:
        return next(e for e in self.events if e[0] == kind)


Journal = list[tuple[str, str, Any]]


class ScriptedFilter:
    """A filter whose answers come from per-event scripts; every call is journaled."""

    def __init__(self, name: str, journal: Journal, **scripts: Callable[..., Any]) -> None:
        self.name = name
        self.journal = journal
        self.scripts = scripts
        self.cb: FilterCallbacks | None = None

    @property
    def callbacks(self) -> FilterCallbacks:
        assert self.cb is not None
        return self.cb

    def set_callbacks(self, callbacks: FilterCallbacks) -> None:
        self.cb = callbacks

    def _run(self, event: str, default: Any, *args: Any) -> Any:
        self.journal.append((self.name, event, args[0] if args else None))
        script = self.scripts.get(event)
        return default if script is None else script(self, *args)

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        result: FilterHeadersStatus = self._run("decode_headers", H.CONTINUE, headers, end_stream)
        return result

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.journal.append((self.name, "decode_data_raw", (bytes(data), end_stream)))
        result: FilterDataStatus = self._run("decode_data", D.CONTINUE, data, end_stream)
        return result

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        result: FilterTrailersStatus = self._run("decode_trailers", T.CONTINUE, trailers)
        return result

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        result: FilterHeadersStatus = self._run("encode_headers", H.CONTINUE, headers, end_stream)
        return result

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.journal.append((self.name, "encode_data_raw", (bytes(data), end_stream)))
        result: FilterDataStatus = self._run("encode_data", D.CONTINUE, data, end_stream)
        return result

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        result: FilterTrailersStatus = self._run("encode_trailers", T.CONTINUE, trailers)
        return result

    def on_log(self) -> None:
        self._run("on_log", None)

    def on_destroy(self) -> None:
        self._run("on_destroy", None)


class Factory:
    def __init__(self, flt: HttpFilter | None, name: str = "f") -> None:
        self.name = name
        self._filter = flt

    def create_filter(self) -> HttpFilter | None:
        return self._filter


def make(*filters: ScriptedFilter | None, buffer_limit: int = 1 << 20) -> tuple[FilterManager, RecordingSink]:
    sink = RecordingSink()
    fm = FilterManager([Factory(f) for f in filters], StreamInfo(), sink, buffer_limit=buffer_limit)
    return fm, sink


def req(method: bytes = b"POST", path: bytes = b"/", **extra: bytes) -> HeaderMap:
    pairs = [(b":method", method), (b":path", path), (b":authority", b"example.com"), (b":scheme", b"http")]
    pairs += [(k.replace("_", "-").encode(), v) for k, v in extra.items()]
    return HeaderMap(pairs)


def resp(status: int = 200, **extra: bytes) -> HeaderMap:
    return HeaderMap([(b":status", str(status).encode())] + [(k.encode(), v) for k, v in extra.items()])


def events_of(journal: Journal, name: str | None = None) -> list[str]:
    return [ev for (n, ev, _) in journal if (name is None or n == name) and not ev.endswith("_raw")]


# ---------------------------------------------------------------------------------------------


def test_pass_through_order_decoders_forward_encoders_reverse() -> None:
    j: Journal = []
    a, b = ScriptedFilter("a", j), ScriptedFilter("b", j)
    fm, sink = make(a, b)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"hello", True)
    fm.on_response_headers(resp(), False)
    fm.on_response_data(b"world", True)
    fm.complete()
    assert [(n, e) for n, e, _ in j if not e.endswith("_raw")] == [
        ("a", "decode_headers"), ("b", "decode_headers"),
        ("a", "decode_data"), ("b", "decode_data"),
        ("b", "encode_headers"), ("a", "encode_headers"),
        ("b", "encode_data"), ("a", "encode_data"),
        ("a", "on_log"), ("b", "on_log"), ("a", "on_destroy"), ("b", "on_destroy"),
    ]  # fmt: skip
    assert sink.kinds() == ["up_headers", "up_data", "down_headers", "down_data"]
    assert sink.upstream_body() == b"hello" and sink.downstream_body() == b"world"
    assert fm.request_complete and fm.response_complete
    assert fm.stream_info.response_code == 200
    assert fm.stream_info.request_body_bytes == 5 and fm.stream_info.response_body_bytes == 5


def test_headers_mutation_reaches_upstream_and_headers_only_request() -> None:
    j: Journal = []

    def add(f: ScriptedFilter, headers: HeaderMap, end: bool) -> H:
        headers.set(b"x-added", b"1")
        return H.CONTINUE

    fm, sink = make(ScriptedFilter("a", j, decode_headers=add))
    fm.on_request_headers(req(b"GET"), True)
    _, headers, end = sink.first("up_headers")
    assert headers.get(b"x-added") == b"1" and end is True
    assert fm.request_complete


def test_stop_iteration_holds_headers_but_body_reaches_same_filter() -> None:
    j: Journal = []
    a = ScriptedFilter(
        "a",
        j,
        decode_headers=lambda f, h, e: H.STOP_ITERATION,
        decode_data=lambda f, d, e: D.CONTINUE if e else D.STOP_ITERATION_AND_BUFFER,
    )
    b = ScriptedFilter("b", j)
    fm, sink = make(a, b)
    fm.on_request_headers(req(), False)
    assert sink.events == []
    fm.on_request_data(b"part1-", False)
    assert sink.events == [] and events_of(j, "b") == []
    fm.on_request_data(b"part2", True)
    # a saw the whole body at the end; b saw the headers then the whole body once.
    assert [x for n, e, x in j if n == "a" and e == "decode_data_raw"] == [
        (b"part1-", False),
        (b"part1-part2", True),
    ]
    assert [x for n, e, x in j if n == "b" and e == "decode_data_raw"] == [(b"part1-part2", True)]
    assert sink.kinds() == ["up_headers", "up_data"]
    assert sink.first("up_headers")[2] is False
    assert sink.upstream_body() == b"part1-part2" and fm.request_complete


def test_stop_iteration_then_async_continue_decoding() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_headers=lambda f, h, e: H.STOP_ITERATION)
    fm, sink = make(a)
    fm.on_request_headers(req(b"GET"), True)
    assert sink.events == []
    a.callbacks.continue_decoding()  # e.g. the answer of an http_call arrived
    assert sink.kinds() == ["up_headers"] and sink.first("up_headers")[2] is True
    a.callbacks.continue_decoding()  # a second continue is a no-op
    assert sink.kinds() == ["up_headers"]


def test_stop_iteration_with_streaming_body_continue_on_first_chunk() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_headers=lambda f, h, e: H.STOP_ITERATION)
    fm, sink = make(a)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"one", False)  # Continue on data while headers held: both go on
    assert sink.kinds() == ["up_headers", "up_data"]
    fm.on_request_data(b"two", True)
    assert sink.upstream_body() == b"onetwo" and sink.events[-1] == ("up_data", b"two", True)


def test_stop_all_iteration_buffers_without_calling_the_filter() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_headers=lambda f, h, e: H.STOP_ALL_ITERATION_AND_BUFFER)
    b = ScriptedFilter("b", j)
    fm, sink = make(a, b)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"x" * 10, False)
    fm.on_request_data(b"y" * 10, True)
    assert "decode_data" not in events_of(j, "a") and sink.events == []
    a.callbacks.continue_decoding()
    # a itself now gets the buffered body (it never saw it), then b.
    assert [x for n, e, x in j if e == "decode_data_raw"] == [(b"x" * 10 + b"y" * 10, True)] * 2
    assert sink.kinds() == ["up_headers", "up_data"]
    assert sink.first("up_headers")[2] is False and sink.events[-1][2] is True


def test_stop_all_iteration_holds_trailers_until_continue() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_headers=lambda f, h, e: H.STOP_ALL_ITERATION_AND_BUFFER)
    fm, sink = make(a)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"body", False)
    fm.on_request_trailers(HeaderMap([(b"x-t", b"1")]))
    assert sink.events == [] and events_of(j, "a") == ["decode_headers"]
    a.callbacks.continue_decoding()
    assert events_of(j, "a") == ["decode_headers", "decode_data", "decode_trailers"]
    assert sink.kinds() == ["up_headers", "up_data", "up_trailers"]
    assert sink.first("up_data")[2] is False


def test_buffer_and_call_again_with_in_place_modification() -> None:
    j: Journal = []

    def upper_at_end(f: ScriptedFilter, data: bytearray, end: bool) -> D:
        if not end:
            return D.STOP_ITERATION_AND_BUFFER
        data[:] = data.upper()
        return D.CONTINUE

    a = ScriptedFilter("a", j, decode_data=upper_at_end)
    b = ScriptedFilter("b", j)
    fm, sink = make(a, b)
    fm.on_request_headers(req(), False)
    assert sink.kinds() == ["up_headers"]  # headers were not held
    for chunk in (b"ab", b"cd"):
        fm.on_request_data(chunk, False)
    fm.on_request_data(b"ef", True)
    assert [x for n, e, x in j if n == "a" and e == "decode_data_raw"] == [
        (b"ab", False),
        (b"abcd", False),
        (b"abcdef", True),
    ]
    assert [x for n, e, x in j if n == "b" and e == "decode_data_raw"] == [(b"ABCDEF", True)]
    assert sink.events[1:] == [("up_data", b"ABCDEF", True)]


def test_stop_iteration_no_buffer_drops_chunk_and_keeps_end_stream_for_continue() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_data=lambda f, d, e: D.STOP_ITERATION_NO_BUFFER)
    fm, sink = make(a)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"dropped", False)
    fm.on_request_data(b"last", True)
    assert sink.upstream_body() == b""
    a.callbacks.continue_decoding()
    assert sink.events[-1] == ("up_data", b"", True) and fm.request_complete


def test_encoder_buffering_response_body_reverse_chain() -> None:
    j: Journal = []

    def buffer_then_append(f: ScriptedFilter, data: bytearray, end: bool) -> D:
        if not end:
            return D.STOP_ITERATION_AND_BUFFER
        data.extend(b"!")
        return D.CONTINUE

    outer = ScriptedFilter("outer", j)
    inner = ScriptedFilter("inner", j, encode_data=buffer_then_append)
    fm, sink = make(outer, inner)
    fm.on_request_headers(req(b"GET"), True)
    fm.on_response_headers(resp(), False)
    fm.on_response_data(b"he", False)
    fm.on_response_data(b"llo", True)
    assert [x for n, e, x in j if n == "outer" and e == "encode_data_raw"] == [(b"hello!", True)]
    assert sink.kinds() == ["up_headers", "down_headers", "down_data"]
    assert sink.downstream_body() == b"hello!"


def test_local_reply_in_decode_headers_goes_through_encoders_that_saw_request() -> None:
    j: Journal = []

    def deny(f: ScriptedFilter, h: HeaderMap, e: bool) -> H:
        f.callbacks.send_local_reply(403, b"denied", [(b"x-why", b"acl")], "ip_acl_denied")
        return H.CONTINUE  # ignored: the decoder chain was aborted

    a, b, c = ScriptedFilter("a", j), ScriptedFilter("b", j, decode_headers=deny), ScriptedFilter("c", j)
    fm, sink = make(a, b, c)
    fm.on_request_headers(req(b"GET"), True)
    assert [(n, e) for n, e, _ in j if not e.endswith("_raw")] == [
        ("a", "decode_headers"), ("b", "decode_headers"),
        ("b", "encode_headers"), ("a", "encode_headers"),
        ("b", "encode_data"), ("a", "encode_data"),
    ]  # fmt: skip
    _, headers, end = sink.first("down_headers")
    assert headers.get(b":status") == b"403" and headers.get(b"x-why") == b"acl"
    assert headers.get(b"content-type") == b"text/plain" and headers.get(b"content-length") == b"6"
    assert end is False and sink.downstream_body() == b"denied"
    assert "up_headers" not in sink.kinds() and not fm.upstream_abandoned
    assert fm.stream_info.response_code == 403 and fm.stream_info.response_code_details == "ip_acl_denied"
    # Late upstream/downstream events are ignored; lifecycle still completes for every filter.
    fm.on_response_headers(resp(), True)
    fm.complete()
    fm.complete()
    for name in "abc":
        assert events_of(j, name)[-2:] == ["on_log", "on_destroy"]
        assert events_of(j, name).count("on_destroy") == 1


def test_local_reply_without_body_is_headers_only() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_headers=lambda f, h, e: (
        f.callbacks.send_local_reply(401, b"", [], "unauthorized"), H.STOP_ITERATION)[1])  # fmt: skip
    fm, sink = make(a)
    fm.on_request_headers(req(b"GET"), True)
    _, headers, end = sink.first("down_headers")
    assert end is True and headers.get(b":status") == b"401" and b"content-type" not in headers
    assert fm.response_complete


def test_local_reply_after_request_reached_upstream_abandons_it() -> None:
    j: Journal = []

    def too_much(f: ScriptedFilter, d: bytearray, e: bool) -> D:
        if b"evil" in d:
            f.callbacks.send_local_reply(400, b"bad body", [], "waf")
        return D.CONTINUE

    a = ScriptedFilter("a", j, decode_data=too_much)
    fm, sink = make(a)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"fine", False)
    fm.on_request_data(b"evil", False)
    assert fm.upstream_abandoned and fm.local_reply_sent
    assert sink.kinds() == ["up_headers", "up_data", "down_headers", "down_data"]
    fm.on_request_data(b"more", True)  # not forwarded any more
    fm.on_response_headers(resp(200), True)  # the abandoned upstream's answer is ignored
    assert sink.kinds() == ["up_headers", "up_data", "down_headers", "down_data"]
    assert sink.first("down_headers")[1].get(b":status") == b"400"


def test_local_reply_during_encode_headers_bypasses_encoders() -> None:
    j: Journal = []

    def replace(f: ScriptedFilter, h: HeaderMap, e: bool) -> H:
        f.callbacks.send_local_reply(502, b"rewritten", [], "bad_upstream")
        return H.CONTINUE

    outer = ScriptedFilter("outer", j)
    inner = ScriptedFilter("inner", j, encode_headers=replace)
    fm, sink = make(outer, inner)
    fm.on_request_headers(req(b"GET"), True)
    fm.on_response_headers(resp(200), False)
    fm.on_response_data(b"original", True)
    assert "encode_headers" not in events_of(j, "outer")
    assert sink.first("down_headers")[1].get(b":status") == b"502"
    assert sink.downstream_body() == b"rewritten" and fm.response_complete


def test_local_reply_after_response_headers_sent_resets() -> None:
    j: Journal = []

    def late(f: ScriptedFilter, d: bytearray, e: bool) -> D:
        f.callbacks.send_local_reply(500, b"late", [], "late_reply")
        return D.CONTINUE

    a = ScriptedFilter("a", j, encode_data=late)
    fm, sink = make(a)
    fm.on_request_headers(req(b"GET"), True)
    fm.on_response_headers(resp(200), False)
    fm.on_response_data(b"x", True)
    assert sink.kinds() == ["up_headers", "down_headers", "reset"]
    assert fm.is_reset and fm.completed  # reset completes the exchange
    assert events_of(j, "a")[-2:] == ["on_log", "on_destroy"]


def test_request_buffer_overflow_gives_413() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_data=lambda f, d, e: D.STOP_ITERATION_AND_BUFFER)
    fm, sink = make(a, buffer_limit=8)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"12345", False)
    fm.on_request_data(b"67890", False)
    _, headers, _ = sink.first("down_headers")
    assert headers.get(b":status") == b"413" and sink.downstream_body() == b"Payload Too Large"
    assert fm.stream_info.response_code_details == "request_payload_too_large"


def test_response_buffer_overflow_gives_500_before_headers_sent() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, encode_headers=lambda f, h, e: H.STOP_ITERATION,
                       encode_data=lambda f, d, e: D.STOP_ITERATION_AND_BUFFER)  # fmt: skip
    fm, sink = make(a, buffer_limit=4)
    fm.on_request_headers(req(b"GET"), True)
    fm.on_response_headers(resp(200), False)
    fm.on_response_data(b"123456", False)
    _, headers, _ = sink.first("down_headers")
    assert headers.get(b":status") == b"500"
    assert fm.stream_info.response_code_details == "response_payload_too_large"
    assert sink.downstream_body() == b"Internal Server Error"


def test_watermark_buffering_pauses_and_resumes_the_request_source() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_headers=lambda f, h, e: H.STOP_ALL_ITERATION_AND_WATERMARK)
    fm, sink = make(a, buffer_limit=4)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"123456", False)
    assert sink.kinds() == ["pause"]
    a.callbacks.continue_decoding()
    assert sink.kinds() == ["pause", "up_headers", "resume", "up_data"]


def test_trailers_pass_and_filter_can_add_trailers_in_last_data_frame() -> None:
    j: Journal = []

    def add_trailer(f: ScriptedFilter, d: bytearray, e: bool) -> D:
        if e:
            f.callbacks.add_request_trailers().add(b"x-checksum", b"abc")
        return D.CONTINUE

    a, b = ScriptedFilter("a", j, decode_data=add_trailer), ScriptedFilter("b", j)
    fm, sink = make(a, b)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"payload", True)
    assert sink.kinds() == ["up_headers", "up_data", "up_trailers"]
    assert sink.first("up_data")[2] is False  # end_stream moved to the trailers
    assert [x for n, e, x in j if n == "b" and e == "decode_data_raw"] == [(b"payload", False)]
    assert sink.first("up_trailers")[1].get(b"x-checksum") == b"abc"
    fm.on_response_headers(resp(), False)
    fm.on_response_trailers(HeaderMap([(b"grpc-status", b"0")]))
    assert sink.kinds()[-2:] == ["down_headers", "down_trailers"]
    assert events_of(j, "a")[-1] == "encode_trailers"


def test_trailers_stop_iteration_then_continue() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_trailers=lambda f, t: T.STOP_ITERATION)
    fm, sink = make(a)
    fm.on_request_headers(req(), False)
    fm.on_request_trailers(HeaderMap([(b"x-t", b"1")]))
    assert sink.kinds() == ["up_headers"]
    a.callbacks.continue_decoding()
    assert sink.kinds() == ["up_headers", "up_trailers"]


def test_continue_called_inside_the_callback_is_applied_after_the_status() -> None:
    j: Journal = []

    def stop_but_continue(f: ScriptedFilter, h: HeaderMap, e: bool) -> H:
        f.callbacks.continue_decoding()
        return H.STOP_ITERATION

    a, b = ScriptedFilter("a", j, decode_headers=stop_but_continue), ScriptedFilter("b", j)
    fm, sink = make(a, b)
    fm.on_request_headers(req(b"GET"), True)
    assert events_of(j) == ["decode_headers", "decode_headers"]
    assert sink.kinds() == ["up_headers"]


def test_downstream_reset_mid_body_still_logs_and_destroys_once() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_data=lambda f, d, e: D.STOP_ITERATION_AND_BUFFER)
    b = ScriptedFilter("b", j)
    fm, sink = make(a, b)
    fm.on_request_headers(req(), False)
    fm.on_request_data(b"partial", False)
    fm.on_downstream_reset()
    assert fm.completed
    fm.on_request_data(b"more", True)
    fm.complete()
    a.callbacks.continue_decoding()  # a late async continue is harmless
    for name in "ab":
        assert events_of(j, name).count("on_log") == 1 and events_of(j, name).count("on_destroy") == 1
    assert "reset" not in sink.kinds()  # the transport already knows the client is gone


def test_filter_reset_stream_resets_sink_and_completes_after_callback_returns() -> None:
    j: Journal = []

    def reset(f: ScriptedFilter, h: HeaderMap, e: bool) -> H:
        f.callbacks.reset_stream()
        assert not events_of(j, "a").count("on_destroy")  # not destroyed under its own feet
        return H.CONTINUE

    a = ScriptedFilter("a", j, decode_headers=reset)
    fm, sink = make(a)
    fm.on_request_headers(req(b"GET"), True)
    assert sink.kinds() == ["reset"] and fm.is_reset and fm.completed
    assert events_of(j, "a") == ["decode_headers", "on_log", "on_destroy"]


def test_filter_exception_becomes_500_and_chain_survives() -> None:
    j: Journal = []

    def boom(f: ScriptedFilter, h: HeaderMap, e: bool) -> H:
        raise RuntimeError("bug")

    fm, sink = make(ScriptedFilter("a", j, decode_headers=boom))
    fm.on_request_headers(req(b"GET"), True)
    assert sink.first("down_headers")[1].get(b":status") == b"500"
    assert fm.stream_info.response_code_details == "filter_raised_RuntimeError"


def test_upstream_failure_is_a_router_local_reply_seen_by_every_filter() -> None:
    j: Journal = []
    a, b = ScriptedFilter("a", j), ScriptedFilter("b", j)
    fm, sink = make(a, b)
    fm.on_request_headers(req(b"GET"), True)
    fm.on_upstream_failure(503, "upstream_reset_before_response_started{connection_failure}")
    assert events_of(j)[2:4] == ["encode_headers", "encode_headers"]
    assert sink.first("down_headers")[1].get(b":status") == b"503"
    assert sink.downstream_body().startswith(b"upstream connect error")
    assert not fm.upstream_abandoned


def test_grpc_request_local_reply_is_trailers_only() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_headers=lambda f, h, e: (
        f.callbacks.send_local_reply(403, b"nope", [], "rbac"), H.STOP_ITERATION)[1])  # fmt: skip
    fm, sink = make(a)
    fm.on_request_headers(req(content_type=b"application/grpc"), False)
    _, headers, end = sink.first("down_headers")
    assert end is True and headers.get(b":status") == b"200"
    assert headers.get(b"grpc-status") == b"7" and headers.get(b"grpc-message") == b"nope"


def test_factory_returning_none_skips_the_filter_and_empty_chain_passes() -> None:
    j: Journal = []
    fm, sink = make(None, ScriptedFilter("b", j))
    fm.on_request_headers(req(b"GET"), True)
    fm.on_response_headers(resp(204), True)
    fm.complete()
    assert sink.kinds() == ["up_headers", "down_headers"] and events_of(j, "b")[-1] == "on_destroy"
    fm2, sink2 = make()
    fm2.on_request_headers(req(b"GET"), True)
    fm2.on_response_headers(resp(200), False)
    fm2.on_response_data(b"ok", True)
    fm2.complete()
    assert sink2.kinds() == ["up_headers", "down_headers", "down_data"]


def test_clear_route_cache_and_callbacks_expose_maps() -> None:
    j: Journal = []
    seen: dict[str, Any] = {}

    def look(f: ScriptedFilter, h: HeaderMap, e: bool) -> H:
        h.set(b":path", b"/rewritten")
        f.callbacks.clear_route_cache()
        seen["req"] = f.callbacks.request_headers()
        seen["resp"] = f.callbacks.response_headers()
        return H.CONTINUE

    fm, sink = make(ScriptedFilter("a", j, decode_headers=look))
    fm.on_request_headers(req(b"GET"), True)
    assert fm.route_cache_cleared and seen["resp"] is None
    assert seen["req"].get(b":path") == b"/rewritten"
    assert sink.first("up_headers")[1].get(b":path") == b"/rewritten"


def test_head_request_local_reply_has_no_body() -> None:
    j: Journal = []
    a = ScriptedFilter("a", j, decode_headers=lambda f, h, e: (
        f.callbacks.send_local_reply(404, b"not here", [], "nope"), H.STOP_ITERATION)[1])  # fmt: skip
    fm, sink = make(a)
    fm.on_request_headers(req(b"HEAD"), True)
    _, headers, end = sink.first("down_headers")
    assert end is True and headers.get(b":status") == b"404" and sink.downstream_body() == b""


def test_encoder_stop_iteration_then_continue_encoding() -> None:
    j: Journal = []
    inner = ScriptedFilter("inner", j, encode_headers=lambda f, h, e: H.STOP_ITERATION,
                           encode_data=lambda f, d, e: D.STOP_ITERATION_AND_BUFFER)  # fmt: skip
    outer = ScriptedFilter("outer", j)
    fm, sink = make(outer, inner)
    fm.on_request_headers(req(b"GET"), True)
    fm.on_response_headers(resp(200), False)
    fm.on_response_data(b"abc", True)
    assert sink.kinds() == ["up_headers"]
    inner.callbacks.continue_encoding()  # e.g. after an http_call answered
    assert sink.kinds() == ["up_headers", "down_headers", "down_data"]
    assert sink.downstream_body() == b"abc" and fm.response_complete
    assert [x for n, e, x in j if n == "outer" and e == "encode_data_raw"] == [(b"abc", True)]


def test_filter_adds_response_trailers_in_last_data_frame() -> None:
    j: Journal = []

    def add(f: ScriptedFilter, d: bytearray, e: bool) -> D:
        if e:
            f.callbacks.add_response_trailers().add(b"x-digest", b"d")
        return D.CONTINUE

    fm, sink = make(ScriptedFilter("a", j, encode_data=add))
    fm.on_request_headers(req(b"GET"), True)
    fm.on_response_headers(resp(200), False)
    fm.on_response_data(b"body", True)
    assert sink.kinds() == ["up_headers", "down_headers", "down_data", "down_trailers"]
    assert sink.first("down_data")[2] is False and sink.first("down_trailers")[1].get(b"x-digest") == b"d"


def test_local_reply_while_an_encoder_holds_upstream_headers_goes_direct() -> None:
    j: Journal = []
    inner = ScriptedFilter("inner", j, encode_headers=lambda f, h, e: H.STOP_ITERATION)
    outer = ScriptedFilter("outer", j)
    fm, sink = make(outer, inner)
    fm.on_request_headers(req(b"GET"), True)
    fm.on_response_headers(resp(200), True)
    inner.callbacks.send_local_reply(503, b"later", [], "async_reply")  # from a timer/callout
    inner.callbacks.continue_encoding()  # a late continue changes nothing
    assert [e[0] for e in sink.events] == ["up_headers", "down_headers", "down_data"]
    assert sink.first("down_headers")[1].get(b":status") == b"503"
    assert "encode_headers" not in events_of(j, "outer")
