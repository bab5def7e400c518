"""Who a request counts against: the peer, or behind a trusted proxy the forwarded address."""

import pytest
import tornado.httputil

from config import parse_settings
from handlers.clients import client_key, parse_networks
from sessions.serving.admission import Budget

PROXIES = parse_networks(["10.0.0.0/8", "::1"])


def request(peer: str, **headers) -> tornado.httputil.HTTPServerRequest:
    fields = tornado.httputil.HTTPHeaders({"Host": "chat.example", **{name.replace("_", "-"): value
                                                                       for name, value in headers.items()}})
    made = tornado.httputil.HTTPServerRequest(
        start_line=tornado.httputil.RequestStartLine("GET", "/", "HTTP/1.1"), headers=fields)
    made.remote_ip = peer
    return made


XFF, REAL_IP, FORWARDED = "X-Forwarded-For", "X-Real-IP", "Forwarded"
UNKNOWN = "unknown behind proxy"


@pytest.mark.parametrize("peer, header, headers, expected", [
    ("203.0.113.9", XFF, {"X_Forwarded_For": "198.51.100.1"}, "203.0.113.9"),  # not a proxy: header ignored
    ("10.1.2.3", XFF, {"X_Forwarded_For": "198.51.100.1"}, "198.51.100.1"),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "6.6.6.6, 198.51.100.1, 10.9.9.9"}, "198.51.100.1"),  # nearest untrusted
    ("10.1.2.3", XFF, {"X_Forwarded_For": "198.51.100.1", "X_Real_IP": "6.6.6.6"}, "198.51.100.1"),
    ("10.1.2.3", XFF, {"X_Real_IP": "198.51.100.7"}, UNKNOWN),  # only the named header is read
    # The proxy sets X-Real-IP and passes the client's own X-Forwarded-For through: a forgery.
    ("10.1.2.3", REAL_IP, {"X_Forwarded_For": "6.6.6.6", "X_Real_IP": "198.51.100.7"}, "198.51.100.7"),
    ("10.1.2.3", REAL_IP, {"X_Forwarded_For": "6.6.6.6"}, UNKNOWN),
    ("10.1.2.3", REAL_IP, {"X_Real_IP": "198.51.100.7:5678"}, "198.51.100.7"),
    ("10.1.2.3", REAL_IP, {"X_Real_IP": "10.5.5.5"}, "10.5.5.5"),
    # Ports and brackets, on the client's hop and on a trusted one.
    ("10.1.2.3", XFF, {"X_Forwarded_For": "6.6.6.6, 198.51.100.1:5678"}, "198.51.100.1"),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "6.6.6.6, 198.51.100.1, 10.9.9.9:8080"}, "198.51.100.1"),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "[2001:db8:5:6::7]:443"}, "2001:db8:5:6::/64"),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "[2001:db8:5:6::7]"}, "2001:db8:5:6::/64"),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "6.6.6.6, [::1]:443"}, "6.6.6.6"),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "[::ffff:198.51.100.3]:80"}, "198.51.100.3"),
    ("::1", XFF, {"X_Forwarded_For": "2001:db8:5:6::7"}, "2001:db8:5:6::/64"),
    # Every hop a trusted proxy: the left-most one sent the request.
    ("10.1.2.3", XFF, {"X_Forwarded_For": "10.5.5.5, 10.9.9.9"}, "10.5.5.5"),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "::1"}, "::/64"),
    # Garbage: behind an untrusted hop it does not matter; reached first, the client is unknown.
    ("10.1.2.3", XFF, {"X_Forwarded_For": "garbage, 198.51.100.1"}, "198.51.100.1"),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "198.51.100.1, garbage"}, UNKNOWN),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "198.51.100.1, garbage, 10.9.9.9"}, UNKNOWN),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "198.51.100.1,"}, UNKNOWN),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "198.51.100.1:http"}, UNKNOWN),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "198.51.100.1:123456"}, UNKNOWN),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "[198.51.100.1"}, UNKNOWN),
    ("10.1.2.3", XFF, {"X_Forwarded_For": "[]:80"}, UNKNOWN),
    ("10.1.2.3", REAL_IP, {"X_Real_IP": "not an address"}, UNKNOWN),
    # No header, or an empty one: never the proxy's own address.
    ("10.1.2.3", XFF, {}, UNKNOWN),
    ("10.1.2.3", XFF, {"X_Forwarded_For": " "}, UNKNOWN),
    ("10.1.2.3", REAL_IP, {"X_Real_IP": ""}, UNKNOWN),
    # RFC 7239: the for= of each element.
    ("10.1.2.3", FORWARDED, {"Forwarded": "for=198.51.100.1;proto=https;by=10.1.2.3"}, "198.51.100.1"),
    ("10.1.2.3", FORWARDED, {"Forwarded": 'for=6.6.6.6, proto=http;For="[2001:db8:cafe::17]:4711"'},
     "2001:db8:cafe::/64"),
    ("10.1.2.3", FORWARDED, {"Forwarded": 'for="198.51.100.1:80", for=10.9.9.9'}, "198.51.100.1"),
    ("10.1.2.3", FORWARDED, {"Forwarded": "for=198.51.100.1, for=_hidden"}, UNKNOWN),
    ("10.1.2.3", FORWARDED, {"Forwarded": "proto=https", "X_Forwarded_For": "198.51.100.1"}, UNKNOWN),
    ("10.1.2.3", "CF-Connecting-IP", {"CF_Connecting_IP": "198.51.100.9"}, "198.51.100.9"),
    # The peer itself: IPv6 by /64, IPv4-mapped as IPv4.
    ("2001:db8:1:2:aaaa::1", XFF, {}, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", XFF, {}, "2001:db8:1:2::/64"),  # same /64, same client
    ("::ffff:198.51.100.3", XFF, {}, "198.51.100.3"),
])
def test_client_key(peer, header, headers, expected):
    assert client_key(request(peer, **headers), PROXIES, header) == expected


def test_the_header_defaults_to_x_forwarded_for_and_is_set_by_flag_or_environment():
    assert parse_settings([], environ={}).client_ip_header == XFF
    assert client_key(request("10.1.2.3", X_Forwarded_For="198.51.100.1", X_Real_IP="6.6.6.6"),
                      PROXIES, parse_settings([], environ={}).client_ip_header) == "198.51.100.1"
    environ = {"SWARM_CHAT_CLIENT_IP_HEADER": REAL_IP}
    assert parse_settings([], environ=environ).client_ip_header == REAL_IP
    assert parse_settings(["--client-ip-header", FORWARDED], environ=environ).client_ip_header == FORWARDED


@pytest.mark.parametrize("name", ["", "X Real IP", "X-Real-IP:", "X-Forwarded-For,X-Real-IP"])
def test_what_is_not_a_header_name_is_refused(name):
    with pytest.raises(SystemExit, match="--client-ip-header"):
        parse_settings(["--client-ip-header", name], environ={})


def test_a_budget_allows_bursts_then_makes_the_sender_wait_what_it_overspent():
    now = [0.0]
    rate = Budget(2.0, 4.0, clock=lambda: now[0])
    assert [rate.delay() for _ in range(4)] == [0.0] * 4
    assert rate.delay() == pytest.approx(0.5)  # one message beyond the burst: half a second at 2/s
    assert rate.delay() == pytest.approx(1.0)  # the debt adds up
    now[0] += 1.0
    assert rate.delay() == pytest.approx(0.5)
    now[0] += 10.0
    assert rate.delay(3.0) == 0.0  # refilled up to the burst, no further
    assert rate.delay(2.0) == pytest.approx(0.5)
