"""Who a request comes from, for the per-client limits."""

import ipaddress
import re
from typing import List, Optional, Sequence, Union

import tornado.httputil

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
# IPv6 clients usually get a whole /64 each: counted per address, one could rotate past every limit.
IPV6_CLIENT_PREFIX = 64
# The client of a request from a trusted proxy that does not say whom it forwards for (no header,
# or an unusable hop): one shared key, so that a client cannot rotate garbage past its limits.
UNKNOWN_BEHIND_PROXY = "unknown behind proxy"
# A hop written with a port: "1.2.3.4:5678", "[2001:db8::1]:443" (or bracketed without one).
_WITH_PORT = re.compile(r"\[(?P<bracketed>[^\]]+)\](?::[0-9]{1,5})?|(?P<ipv4>[0-9.]+):[0-9]{1,5}")


def parse_networks(entries: Sequence[str]) -> tuple:
    """Addresses or CIDR networks as network objects."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _address(text: str) -> Optional[Address]:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _hop_address(hop: str) -> Optional[Address]:
    """The address of one forwarded hop, its port and brackets stripped; None if it is none."""
    hop = hop.strip().strip('"')  # RFC 7239 quotes addresses with a port or brackets
    with_port = _WITH_PORT.fullmatch(hop)
    if with_port:
        hop = with_port.group("bracketed") or with_port.group("ipv4")
    return _address(hop)


def _forwarded_for(element: str) -> str:
    """The ``for=`` value of one RFC 7239 ``Forwarded`` element ("" when it has none)."""
    for pair in element.split(";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "for":
            return value
    return ""


def _hops(request: tornado.httputil.HTTPServerRequest, header: str) -> List[str]:
    """The hops ``header`` lists, left (farthest from us) to right; repeated headers count as one list."""
    value = request.headers.get(header, "")
    if not value.strip():
        return []
    elements = value.split(",")
    if header.lower() == "forwarded":
        return [_forwarded_for(element) for element in elements]
    return elements


def _key(address: Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(address)


def client_key(request: tornado.httputil.HTTPServerRequest, trusted_proxies: Sequence[Network],
               header: str) -> str:
    """The client a request counts against (IPv6 clients by /64, IPv4-mapped ones as IPv4).

    A peer that is not a trusted proxy is the client, whatever its headers say. From a trusted
    proxy, only ``header`` is read (``X-Forwarded-For``, ``X-Real-IP``, ``Forwarded``'s ``for=``
    or any other the proxy sets), never another one. Its hops are read from the right, where the
    proxy appended the address it saw: hops that are trusted proxies are passed over, and the
    first one that is not is the client. A hop may carry a port and brackets (``1.2.3.4:5678``,
    ``[2001:db8::1]:443``). When every hop is a trusted proxy, the left-most is the client. An
    empty or missing header, or an unparseable hop reached before any untrusted one, means a
    trusted proxy did not say whom it forwards for: the client is ``UNKNOWN_BEHIND_PROXY``, one
    key for all such requests, never the proxy's own address nor the garbage text.
    """
    peer = _address(request.remote_ip or "")
    if peer is None:
        return request.remote_ip or "unknown"

    def trusted(address: Address) -> bool:
        return any(address in network for network in trusted_proxies)

    if not trusted_proxies or not trusted(peer):
        return _key(peer)
    hops = _hops(request, header)
    if not hops:
        return UNKNOWN_BEHIND_PROXY
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            return UNKNOWN_BEHIND_PROXY
        if not trusted(address):
            return _key(address)
    return _key(address)  # every hop is a trusted proxy: the left-most one sent the request
