"""An Envoy bootstrap that gets everything over ADS from the control plane (or the agent)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from wasmesh.security.ca import CONTROL_PLANE_SERVER_NAME

XDS_CLUSTER = "xds-grpc"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
UPSTREAM_TLS_CONTEXT = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


@dataclass(frozen=True)
class BootstrapTls:
    """Files Envoy reads for mTLS straight to the control plane (no agent in between).

    Envoy reads them at start; to rotate, rewrite them and restart Envoy — or run Envoy behind
    `wasmesh agent`, which holds and rotates the certificate itself (Istio's shape)."""

    root_cert: str  # the mesh root CA (ca-cert.pem)
    cert: str  # the workload certificate (`wasmesh control-plane cert create`)
    key: str
    server_name: str = CONTROL_PLANE_SERVER_NAME


def tls_transport_socket(tls: BootstrapTls) -> dict[str, Any]:
    """The xds-grpc cluster's transport socket: our certificate, and the control plane's verified
    against the mesh root and its DNS SAN (the name istiod's serving certificate carries)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"type.googleapis.com/{UPSTREAM_TLS_CONTEXT}",
            "sni": tls.server_name,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {"certificate_chain": {"filename": tls.cert}, "private_key": {"filename": tls.key}}
                ],
                "validation_context": {
                    "trusted_ca": {"filename": tls.root_cert},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": tls.server_name}}
                    ],
                },
            },
        },
    }


def parse_labels(text: str) -> dict[str, str]:
    """`app=web,version=v1` → {"app": "web", "version": "v1"}; raises ValueError naming the bad item."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--labels: expected KEY=VALUE, got {item!r}")
        labels[key.strip()] = value.strip()
    return labels


def split_host_port(text: str, flag: str = "--xds") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def build_bootstrap(
    xds_host: str,
    xds_port: int,
    node_id: str,
    labels: Mapping[str, str],
    namespace: str = "default",
    admin_port: int = 15000,
    workload_name: str | None = None,
    tls: BootstrapTls | None = None,
) -> dict[str, Any]:
    """`tls`: talk mTLS to `xds_host:xds_port` (the control plane); None: plain text (the agent
    on loopback, or a --plaintext control plane)."""
    metadata: dict[str, Any] = {"LABELS": dict(labels), "NAMESPACE": namespace}
    if workload_name:
        metadata["WORKLOAD_NAME"] = workload_name
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    bootstrap: dict[str, Any] = {
        "node": {"id": node_id, "cluster": namespace, "metadata": metadata},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        HTTP_PROTOCOL_OPTIONS: {
                            "@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": xds_host,
                                                    "port_value": xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }
    if tls is not None:
        bootstrap["static_resources"]["clusters"][0]["transport_socket"] = tls_transport_socket(tls)
    return bootstrap


class _PlainDumper(yaml.SafeDumper):
    """Writes a shared object out in full each time: no `&id001` anchors or `*id001` aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_bootstrap(bootstrap: Mapping[str, Any]) -> str:
    return yaml.dump(dict(bootstrap), Dumper=_PlainDumper, sort_keys=False)
