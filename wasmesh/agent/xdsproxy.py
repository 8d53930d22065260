"""The agent's xDS proxy: Envoy talks ADS to the agent, the agent talks ADS to the control plane.

Like istio-agent's ``xds_proxy.go``, every downstream (Envoy) stream gets its own upstream stream.
Requests go upstream untouched; responses come back untouched — except ECDS responses, whose Wasm
resources are converted to local files first (``wasmesh.agent.convert``). When a response holds a
resource the agent cannot read, the agent NACKs it upstream itself (code 13, Envoy's last ACKed ECDS
version, the response's nonce) and Envoy never sees it. When a module cannot be fetched, Envoy gets the
RBAC fallback and ACKs it; that ACK goes upstream as a fetch-failure report (error_detail code
``FETCH_FAILURE_CODE``, one part per resource), so the control plane's plugin status shows the failure.

ECDS responses are converted one at a time per stream, in arrival order, while other types keep
flowing: a slow download never delays LDS/CDS, and an older ECDS version can never overtake a newer one
(istio-agent converts each ECDS response in its own goroutine, which allows that reordering).

``AgentServer`` also serves ``/metrics`` (the ``istio_agent_wasm_*`` series) and ``/ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from wasmesh.agent.cache import ModuleCache
from wasmesh.agent.convert import ConversionError, EcdsConverter
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.options import CacheOptions
from wasmesh.security.workload import WorkloadCertificates, XdsTlsOptions, stop_task
from wasmesh.xds import types
from wasmesh.xds.server import FETCH_FAILURE_CODE

log = logging.getLogger("wasmesh.agent.xdsproxy")

NACK_CODE = 13  # codes.Internal, what istio-agent puts in its own NACKs
# ECDS responses may carry large plugin configurations; gRPC's 4 MiB default is too small.
MAX_MESSAGE_BYTES = 64 << 20
_GRPC_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


@dataclass
class EcdsAckState:
    """What Envoy last told us about ECDS on one stream (istio-agent's ecdsLastAckVersion/Nonce)."""

    last_ack_version: str = ""
    last_nonce: str = ""
    resource_names: list[str] = field(default_factory=list)

    def observe(self, request: discovery_pb2.DiscoveryRequest) -> None:
        if request.type_url != types.EXTENSION_CONFIG:
            return
        if not request.HasField("error_detail"):
            self.last_ack_version = request.version_info
        self.last_nonce = request.response_nonce
        self.resource_names = list(request.resource_names)

    def nack(self, response: discovery_pb2.DiscoveryResponse, reason: str) -> discovery_pb2.DiscoveryRequest:
        """The agent's own NACK of ``response``.

        It repeats Envoy's subscribed names: in state-of-the-world xDS a request's names replace the
        subscription, so a NACK without them would unsubscribe Envoy from every extension config.
        """
        return discovery_pb2.DiscoveryRequest(
            version_info=self.last_ack_version,
            type_url=types.EXTENSION_CONFIG,
            response_nonce=response.nonce,
            resource_names=self.resource_names,
            error_detail=status_pb2.Status(code=NACK_CODE, message=reason),
        )


_END = object()  # end of a queue


class _ProxiedStream:
    """One Envoy stream and the upstream stream opened for it."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        converter: EcdsConverter,
        downstream: AsyncIterator[discovery_pb2.DiscoveryRequest],
        peer: str,
    ) -> None:
        self.channel = channel
        self.converter = converter
        self.downstream = downstream
        self.peer = peer
        self.ecds = EcdsAckState()
        self.to_upstream: asyncio.Queue[discovery_pb2.DiscoveryRequest | object] = asyncio.Queue()
        self.to_envoy: asyncio.Queue[discovery_pb2.DiscoveryResponse | BaseException | object]
        self.to_envoy = asyncio.Queue()
        self.ecds_responses: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue()
        # nonce of a response sent to Envoy with RBAC fallbacks → the fetch failures, until Envoy answers it
        self.fetch_reports: dict[str, str] = {}

    async def _upstream_requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            item = await self.to_upstream.get()
            if not isinstance(item, discovery_pb2.DiscoveryRequest):
                return
            yield item

    async def _forward_requests(self) -> None:
        try:
            async for request in self.downstream:
                self.ecds.observe(request)
                self.to_upstream.put_nowait(self._with_fetch_report(request))
        finally:
            self.to_upstream.put_nowait(_END)  # Envoy closed: half-close upstream too

    async def _forward_responses(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for response in call:
                if response.type_url == types.EXTENSION_CONFIG:
                    self.ecds_responses.put_nowait(response)
                else:
                    self.to_envoy.put_nowait(response)
        except grpc.aio.AioRpcError as exc:
            self.to_envoy.put_nowait(exc)
            return
        self.to_envoy.put_nowait(_END)

    def _with_fetch_report(self, request: discovery_pb2.DiscoveryRequest) -> discovery_pb2.DiscoveryRequest:
        """Envoy's answer to a response that carried RBAC fallbacks, with the fetch failures added.

        Envoy ACKs the fallbacks; the control plane still has to learn that the modules did not load,
        so the ACK goes upstream as a report with code FETCH_FAILURE_CODE naming each resource (the
        control plane counts it as ACKed, not rejected). A NACK gets the failures appended.
        """
        if request.type_url != types.EXTENSION_CONFIG:
            return request
        report = self.fetch_reports.pop(request.response_nonce, None)
        if report is None:
            return request
        rewritten = discovery_pb2.DiscoveryRequest()
        rewritten.CopyFrom(request)
        if request.HasField("error_detail"):
            rewritten.error_detail.message = f"{request.error_detail.message}; {report}"
        else:
            rewritten.error_detail.CopyFrom(status_pb2.Status(code=FETCH_FAILURE_CODE, message=report))
        return rewritten

    async def _convert_ecds(self) -> None:
        while True:
            response = await self.ecds_responses.get()
            try:
                converted_response = await self.converter.convert_response_reporting(response.resources)
                resources = converted_response.resources
            except ConversionError as exc:
                log.warning(
                    "xDS proxy %s: NACK ECDS version %s nonce %s: %s",
                    self.peer,
                    response.version_info,
                    response.nonce,
                    exc,
                )
                self.to_upstream.put_nowait(self.ecds.nack(response, str(exc)))
                continue
            if converted_response.fallbacks:
                self.fetch_reports[response.nonce] = "; ".join(converted_response.fallbacks)
            converted = discovery_pb2.DiscoveryResponse()
            converted.CopyFrom(response)
            del converted.resources[:]
            converted.resources.extend(resources)
            self.to_envoy.put_nowait(converted)

    async def run(self) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        call = stub.StreamAggregatedResources(self._upstream_requests())
        tasks = [
            asyncio.create_task(self._forward_requests(), name=f"xds-proxy-requests-{self.peer}"),
            asyncio.create_task(self._forward_responses(call), name=f"xds-proxy-responses-{self.peer}"),
            asyncio.create_task(self._convert_ecds(), name=f"xds-proxy-ecds-{self.peer}"),
        ]
        try:
            while True:
                item = await self.to_envoy.get()
                if isinstance(item, discovery_pb2.DiscoveryResponse):
                    yield item
                elif isinstance(item, BaseException):
                    raise item
                else:
                    return
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task


class XdsProxy(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """ADS server for Envoy that proxies every stream to ``upstream`` (``HOST:PORT``)."""

    def __init__(
        self, upstream: str, converter: EcdsConverter, certificates: WorkloadCertificates | None = None
    ) -> None:
        """`certificates`: talk mTLS upstream with this workload certificate (Envoy talks to us
        locally, as Envoy talks to istio-agent over a UDS); None: plain text upstream."""
        self.upstream = upstream
        self.converter = converter
        self.certificates = certificates
        self.active_streams = 0
        self._channel: grpc.aio.Channel | None = None
        self._channel_rotation = -1
        # Channels of earlier certificates: streams opened on them keep running; closed on stop.
        self._retired: list[grpc.aio.Channel] = []
        self._rotation: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen for Envoy; returns the bound port."""
        if self.certificates is None:
            self._channel = grpc.aio.insecure_channel(self.upstream, options=list(_GRPC_OPTIONS))
        else:
            self._rotation = asyncio.create_task(self.certificates.run_rotation(), name="workload-cert")
        self._server = grpc.aio.server(options=list(_GRPC_OPTIONS))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        bound = int(self._server.add_insecure_port(f"{host}:{port}"))
        if bound == 0:
            raise OSError(f"--listen: cannot listen on {host}:{port}")
        await self._server.start()
        return bound

    async def stop(self, grace: float | None = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        await stop_task(self._rotation)
        for channel in [*self._retired, *([self._channel] if self._channel is not None else [])]:
            await channel.close()

    async def _upstream_channel(self) -> grpc.aio.Channel:
        """The channel for a new upstream stream: over mTLS, with the current certificate."""
        certificates = self.certificates
        if certificates is None:
            assert self._channel is not None, "XdsProxy.start() was not awaited"
            return self._channel
        await certificates.ensure()
        if self._channel is None or self._channel_rotation != certificates.rotations:
            if self._channel is not None:
                self._retired.append(self._channel)
            self._channel = await certificates.channel(self.upstream)
            self._channel_rotation = certificates.rotations
        return self._channel

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        peer = str(context.peer())
        try:
            channel = await self._upstream_channel()
        except (grpc.aio.AioRpcError, OSError, ValueError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.warning("xDS proxy %s: no workload certificate: %s", peer, detail)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"agent: no workload certificate: {detail}")
            raise  # not reached: abort raises
        stream = _ProxiedStream(channel, self.converter, request_iterator, peer)
        self.active_streams += 1
        log.info("xDS proxy: Envoy connected from %s, opened upstream stream to %s", peer, self.upstream)
        try:
            async for response in stream.run():
                yield response
        except grpc.aio.AioRpcError as exc:
            # The control plane went away: end Envoy's stream too; Envoy reconnects (and so do we).
            log.info("xDS proxy %s: upstream stream ended: %s", peer, exc.code())
            await context.abort(exc.code(), f"upstream {self.upstream}: {exc.details() or exc.code().name}")
        finally:
            self.active_streams -= 1


# ------------------------------------------------------------------------------------- the agent


def parse_http_request_target(head: bytes) -> tuple[str, str]:
    """(method, path without query) from an HTTP/1.x request head; ValueError when malformed."""
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"malformed request line {request_line!r}")
    return parts[0], parts[1].split("?", 1)[0]


@dataclass(frozen=True)
class AgentOptions:
    upstream: str  # HOST:PORT of the control plane's ADS server
    listen_host: str = "127.0.0.1"
    listen_port: int = 15010
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 15020  # None: no metrics/readiness server
    cache: CacheOptions = field(default_factory=CacheOptions)
    conversion_enabled: bool = True
    tls: XdsTlsOptions | None = None  # None: plain text to the control plane (--plaintext)


class AgentServer:
    """The running agent: module cache + converter + xDS proxy + metrics/readiness endpoint."""

    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.metrics = AgentMetrics()
        self.cache = ModuleCache(options.cache, self.metrics)
        self.converter = EcdsConverter(self.cache, self.metrics, enabled=options.conversion_enabled)
        tls = options.tls
        certificates = WorkloadCertificates(tls, options.upstream) if tls is not None else None
        self.proxy = XdsProxy(options.upstream, self.converter, certificates)
        self.xds_port = 0
        self.metrics_port = 0
        self.ready = False
        self._http: asyncio.Server | None = None
        self._purger: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.xds_port = await self.proxy.start(self.options.listen_host, self.options.listen_port)
        if self.options.metrics_port is not None:
            self._http = await asyncio.start_server(
                self._serve_http, self.options.metrics_host, self.options.metrics_port
            )
            self.metrics_port = int(self._http.sockets[0].getsockname()[1])
        self._purger = asyncio.create_task(self.cache.run_purger(), name="wasm-cache-purger")
        self.ready = True
        log.info(
            "agent: xDS proxy on %s:%d -> %s, metrics on port %s",
            self.options.listen_host,
            self.xds_port,
            self.options.upstream,
            self.metrics_port or "-",
        )

    async def stop(self) -> None:
        self.ready = False
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
        await self.proxy.stop()
        self.cache.close()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path = parse_http_request_target(head)
            status, content_type, body = self._route(method, path)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        header = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(header.encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path in ("/metrics", "/stats/prometheus"):
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", self.metrics.render().encode()
        if path in ("/ready", "/healthz/ready"):
            if self.ready:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        return "404 Not Found", "text/plain", b"not found\n"
