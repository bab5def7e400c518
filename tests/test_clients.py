"""Who a request counts against: the peer, or behind a trusted proxy the forwarded address."""

import pytest
import tornado.httputil

from handlers.clients import client_key, parse_networks
from sessions.admission import MessageRate
from sessions.errors import RateLimited

PROXIES = parse_networks(["10.0.0.0/8", "::1"])


def request(peer: str, **headers) -> tornado.httputil.HTTPServerRequest:
    fields = tornado.httputil.HTTPHeaders({"Host": "chat.example", **{name.replace("_", "-"): value
                                                                       for name, value in headers.items()}})
    made = tornado.httputil.HTTPServerRequest(
        start_line=tornado.httputil.RequestStartLine("GET", "/", "HTTP/1.1"), headers=fields)
    made.remote_ip = peer
    return made


@pytest.mark.parametrize("peer, headers, expected", [
    ("203.0.113.9", {"X_Forwarded_For": "198.51.100.1"}, "203.0.113.9"),  # not a proxy: header ignored
    ("10.1.2.3", {"X_Forwarded_For": "198.51.100.1"}, "198.51.100.1"),
    ("10.1.2.3", {"X_Forwarded_For": "6.6.6.6, 198.51.100.1, 10.9.9.9"}, "198.51.100.1"),  # nearest untrusted hop
    ("10.1.2.3", {"X_Real_IP": "198.51.100.7"}, "198.51.100.7"),
    ("10.1.2.3", {}, "10.1.2.3"),
    ("10.1.2.3", {"X_Forwarded_For": "not an address"}, "10.1.2.3"),
    ("2001:db8:1:2:aaaa::1", {}, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", {}, "2001:db8:1:2::/64"),  # same /64, same client
    ("::1", {"X_Forwarded_For": "2001:db8:5:6::7"}, "2001:db8:5:6::/64"),
    ("::ffff:198.51.100.3", {}, "198.51.100.3"),
])
def test_client_key(peer, headers, expected):
    assert client_key(request(peer, **headers), PROXIES) == expected


def test_message_rate_allows_bursts_and_refills():
    now = [0.0]
    rate = MessageRate(2.0, clock=lambda: now[0])
    for _ in range(4):
        rate.check()
    with pytest.raises(RateLimited):
        rate.check()
    now[0] += 1.0
    rate.check()
    rate.check()
    with pytest.raises(RateLimited):
        rate.check()
