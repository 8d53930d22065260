"""The xDS proxy's own protocol duties, against a scripted upstream ADS server over real gRPC.

The wasmesh control plane never sends malformed ECDS, so the NACK path needs an upstream that does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from envoy.config.core.v3 import extension_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from wasmesh.agent.options import CacheOptions
from wasmesh.agent.xdsproxy import AgentOptions, AgentServer, parse_http_request_target
from wasmesh.xds.types import EXTENSION_CONFIG as EXTENSION_CONFIG_TYPE

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"


class ScriptedUpstream(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Answers each ECDS request by the nonce it carries (``script[nonce]``); records every request."""

    def __init__(self, script: dict[str, list[discovery_pb2.DiscoveryResponse]]) -> None:
        self.script = script
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: object
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        async for request in request_iterator:
            self.requests.put_nowait(request)
            if request.type_url == EXTENSION_CONFIG_TYPE and not request.HasField("error_detail"):
                for response in self.script.get(request.response_nonce, []):
                    yield response


def ecds_response(version: str, nonce: str, resources: list[any_pb2.Any]) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        version_info=version, nonce=nonce, type_url=EXTENSION_CONFIG_TYPE, resources=resources
    )


def packed_extension(name: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(extension_pb2.TypedExtensionConfig(name=name))  # no typed_config: unreadable
    return packed


async def scenario(tmp_path: Path) -> None:
    listener_response = discovery_pb2.DiscoveryResponse(
        version_info="l1", nonce="n-l1", type_url=LISTENER_TYPE
    )
    upstream = ScriptedUpstream(
        {
            "": [ecds_response("1", "n1", [])],  # empty: readable, forwarded
            "n1": [  # after Envoy's ACK of version 1
                ecds_response("2", "n2", [packed_extension("broken")]),  # unreadable: NACKed by the agent
                listener_response,  # other types pass through
            ],
        }
    )
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(upstream, server)
    upstream_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    agent = AgentServer(
        AgentOptions(
            upstream=f"127.0.0.1:{upstream_port}",
            listen_port=0,
            metrics_port=0,
            cache=CacheOptions(dir=tmp_path / "cache"),
        )
    )
    await agent.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.xds_port}")
    outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

    async def envoy_requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await outbox.get()

    try:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            envoy_requests()
        )
        outbox.put_nowait(
            discovery_pb2.DiscoveryRequest(type_url=EXTENSION_CONFIG_TYPE, resource_names=["a"])
        )
        first = await asyncio.wait_for(call.read(), 10)
        assert (first.type_url, first.version_info, first.nonce) == (EXTENSION_CONFIG_TYPE, "1", "n1")
        # Envoy ACKs version 1: that becomes the version the agent's own NACK reports.
        outbox.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=EXTENSION_CONFIG_TYPE, version_info="1", response_nonce="n1", resource_names=["a"]
            )
        )
        second = await asyncio.wait_for(call.read(), 10)
        assert second.type_url == LISTENER_TYPE  # version 2 of ECDS never reached Envoy

        seen = [await asyncio.wait_for(upstream.requests.get(), 10) for _ in range(3)]
        nack = seen[2]
        assert nack.type_url == EXTENSION_CONFIG_TYPE
        assert nack.HasField("error_detail") and nack.error_detail.code == 13
        assert (nack.version_info, nack.response_nonce) == ("1", "n2")
        assert list(nack.resource_names) == ["a"]  # the subscription is kept
        assert "does not contain any typed config" in nack.error_detail.message
        assert agent.metrics.config_conversion_count.value("unmarshal_failure") == 1

        # The metrics/readiness endpoint.
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = (await reader.read()).decode()
        writer.close()
        assert text.startswith("HTTP/1.1 200 OK")
        assert 'istio_agent_wasm_config_conversion_count{result="unmarshal_failure"} 1' in text
        assert "istio_agent_wasm_config_conversion_duration_count 2" in text
        call.cancel()
    finally:
        await channel.close()
        await agent.stop()
        await server.stop(0)


def test_malformed_ecds_is_nacked_with_last_acked_version(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path))


def test_upstream_going_away_ends_envoys_stream(tmp_path: Path) -> None:
    async def run() -> None:
        agent = AgentServer(
            AgentOptions(
                upstream="127.0.0.1:1", listen_port=0, metrics_port=None, cache=CacheOptions(dir=tmp_path)
            )
        )
        await agent.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.xds_port}")
        try:

            async def one_request() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
                yield discovery_pb2.DiscoveryRequest(type_url=LISTENER_TYPE)
                await asyncio.sleep(30)

            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
                one_request()
            )
            try:
                await asyncio.wait_for(call.read(), 15)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert "upstream 127.0.0.1:1" in (exc.details() or "")
            else:
                raise AssertionError("the stream should have failed")
        finally:
            await channel.close()
            await agent.stop()

    asyncio.run(run())


def test_parse_http_request_target() -> None:
    assert parse_http_request_target(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == ("GET", "/metrics")
    for bad in (b"GET /metrics\r\n\r\n", b"\r\n\r\n", b"GET / SMTP\r\n\r\n"):
        try:
            parse_http_request_target(bad)
        except ValueError as exc:
            assert "malformed request line" in str(exc)
        else:
            raise AssertionError(bad)
