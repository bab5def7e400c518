"""Who a request comes from, for the per-client limits."""

import ipaddress
from typing import Sequence, Union

import tornado.httputil

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
# IPv6 clients usually get a whole /64 each: counted per address, one could rotate past every limit.
IPV6_CLIENT_PREFIX = 64


def parse_networks(entries: Sequence[str]) -> tuple:
    """Addresses or CIDR networks as network objects."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _address(text: str):
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_key(request: tornado.httputil.HTTPServerRequest, trusted_proxies: Sequence[Network]) -> str:
    """The client a request counts against: its peer address, or, when the peer is a trusted proxy,
    the nearest untrusted address in ``X-Forwarded-For`` (or ``X-Real-IP``); IPv6 clients by /64."""
    peer = _address(request.remote_ip or "")
    if peer is None:
        return request.remote_ip or "unknown"

    def trusted(address) -> bool:
        return any(address in network for network in trusted_proxies)

    if trusted_proxies and trusted(peer):
        forwarded = request.headers.get("X-Forwarded-For") or request.headers.get("X-Real-IP") or ""
        # Proxies append the address they saw: read from the right, skipping our own proxies.
        for hop in reversed(forwarded.split(",")):
            address = _address(hop)
            if address is None:
                break
            peer = address
            if not trusted(address):
                break
    if isinstance(peer, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{peer}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(peer)
