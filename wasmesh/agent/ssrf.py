"""Which addresses a module fetch may connect to (Istio's ``pkg/wasm/ssrf.go``, checked after DNS).

Always refused, as current Istio does: link-local addresses (169.254.0.0/16 and fe80::/10, which hold
the cloud instance-metadata endpoints such as 169.254.169.254; and the link-local multicast blocks
224.0.0.0/24 and ff02::/16, as Go's ``IsLinkLocalMulticast``), Alibaba Cloud's metadata address
100.100.100.200 and AWS's IPv6 metadata prefix fd00:ec2::/32. Operators add more with
``BLOCKED_CIDRS_IN_WASM_FETCH`` (comma-separated CIDRs or bare addresses). Loopback and private ranges
stay allowed by default: in-cluster registries and file servers legitimately live there.

The transport resolves a host name once, checks every address it got, and connects only to an address
it checked (no second resolution an attacker's DNS could answer differently). IPv4-mapped IPv6
addresses (``::ffff:169.254.169.254``) are judged as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BLOCKED_CIDRS_ENV = "BLOCKED_CIDRS_IN_WASM_FETCH"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (network, why) pairs refused whatever the operator configures.
ALWAYS_BLOCKED: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("169.254.0.0/16"), "link-local"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
    (ipaddress.ip_network("224.0.0.0/24"), "link-local multicast"),
    (ipaddress.ip_network("ff02::/16"), "link-local multicast"),
    (ipaddress.ip_network("100.100.100.200/32"), "a known cloud metadata address"),
    (ipaddress.ip_network("fd00:ec2::/32"), "a known cloud metadata address"),
)


def parse_blocked_cidrs(text: str, what: str = BLOCKED_CIDRS_ENV) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8, 192.168.1.7"`` -> networks; ValueError naming ``what`` and the bad entry."""
    networks: list[IPNetwork] = []
    for item in text.split(","):
        entry = item.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{what}: invalid CIDR {entry!r} (examples: 10.0.0.0/8, fd00::/8)") from None
    return tuple(networks)


def blocked_cidrs_from_env(env: Mapping[str, str] | None = None) -> tuple[IPNetwork, ...]:
    source = os.environ if env is None else env
    return parse_blocked_cidrs(source.get(BLOCKED_CIDRS_ENV, ""))


def _comparable(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class AddressPolicy:
    """The always-blocked ranges plus ``extra_blocked`` (the operator's)."""

    extra_blocked: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AddressPolicy:
        return cls(blocked_cidrs_from_env(env))

    def refusal(self, address: IPAddress | str) -> str | None:
        """Why ``address`` must not be connected to (one phrase), or None when it may be."""
        parsed = _comparable(ipaddress.ip_address(address) if isinstance(address, str) else address)
        for network, why in ALWAYS_BLOCKED:
            if parsed.version == network.version and parsed in network:
                return f"{parsed} is {why} ({network})"
        for network in self.extra_blocked:
            if parsed.version == network.version and parsed in network:
                return f"{parsed} is in blocked CIDR range {network} ({BLOCKED_CIDRS_ENV})"
        return None

    def first_refusal(self, addresses: Iterable[IPAddress | str]) -> str | None:
        for address in addresses:
            reason = self.refusal(address)
            if reason is not None:
                return reason
        return None
