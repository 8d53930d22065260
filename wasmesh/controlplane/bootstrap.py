"""An Envoy bootstrap that gets everything over ADS from the control plane (or the agent)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import yaml

XDS_CLUSTER = "xds-grpc"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


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
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"LABELS": dict(labels), "NAMESPACE": namespace}
    if workload_name:
        metadata["WORKLOAD_NAME"] = workload_name
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
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


class _PlainDumper(yaml.SafeDumper):
    """Writes a shared object out in full each time: no `&id001` anchors or `*id001` aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_bootstrap(bootstrap: Mapping[str, Any]) -> str:
    return yaml.dump(dict(bootstrap), Dumper=_PlainDumper, sort_keys=False)
