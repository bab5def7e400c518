"""Behind a real nginx: the client a connection counts against is the peer nginx saw, whatever
address the client forges in X-Forwarded-For or X-Real-IP.

nginx runs as a child process with its own configuration in the test's folder. The test server
trusts nginx (127.0.0.1) and allows one WebSocket connection per client; the test's clients
connect from other loopback addresses (127.0.0.2, 127.0.0.3), so that "same client" (the second
is refused) and "another client" (admitted) tell which key each connection got.
"""

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import tornado.httpclient
import tornado.websocket

from tests.ws_client import WSClient

XFF, REAL_IP = "X-Forwarded-For", "X-Real-IP"
PROXY = "127.0.0.1"  # nginx reaches the test server from here
CLIENT, OTHER_CLIENT = "127.0.0.2", "127.0.0.3"
NGINX_START_TIMEOUT = 30
REPLY_TIMEOUT = 10
# How nginx names the client in each mode: one sets X-Real-IP (and passes the client's own
# X-Forwarded-For through), the other appends its peer to X-Forwarded-For (and passes X-Real-IP).
SETS_HEADER = {
    REAL_IP: "proxy_set_header X-Real-IP $remote_addr;",
    XFF: "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
}
NGINX_CONFIG = """
daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen {proxy}:{port};
        location / {{
            proxy_pass http://{proxy}:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            {sets_header}
        }}
    }}
}}
"""


def nginx_binary() -> str:
    """nginx's path; it lives in /usr/sbin, often not on a user's PATH."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    binary = shutil.which("nginx", path=search)
    if binary is None:
        pytest.fail("nginx is not installed: `make test` installs it (Debian package nginx)")
    return binary


def free_port(host: str) -> int:
    """A port nothing listens on now, for nginx to take."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until_listening(process: subprocess.Popen, port: int, error_log: Path) -> None:
    """Returns once nginx accepts connections; fails with its log if it exits or never does."""
    deadline = time.monotonic() + NGINX_START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            socket.create_connection((PROXY, port), timeout=1).close()
            return
        except OSError:
            pass
        try:
            process.wait(0.1)  # a pause that ends early if nginx exits
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"nginx exited with {process.returncode}: {read_log(error_log)}")
    pytest.fail(f"nginx did not listen within {NGINX_START_TIMEOUT} s: {read_log(error_log)}")


def read_log(path: Path) -> str:
    return path.read_text() if path.exists() else "(no error log)"


@pytest.fixture
def one_connection_per_client(manager, monkeypatch):
    """The shared manager allows one WebSocket connection per client for this test."""
    monkeypatch.setattr(manager.admission, "settings",
                        dataclasses.replace(manager.admission.settings, max_connections_per_client=1))


@pytest.fixture
def nginx(serve_with, tmp_path, one_connection_per_client):
    """``nginx(header)``: (nginx's port, the server's port), the server trusting nginx's
    ``header`` and nginx set up to write it."""
    binary = nginx_binary()
    processes = []

    def start(header: str) -> tuple:
        upstream = serve_with(trusted_proxies=(PROXY,), client_ip_header=header)
        port = free_port(PROXY)
        config = tmp_path / "nginx.conf"
        config.write_text(NGINX_CONFIG.format(folder=tmp_path, proxy=PROXY, port=port, upstream=upstream,
                                              sets_header=SETS_HEADER[header]))
        process = subprocess.Popen([binary, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                                    "-c", str(config)])
        processes.append(process)
        wait_until_listening(process, port, tmp_path / "error.log")
        return port, upstream

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def connect(port: int, source: str, forged: str = None) -> WSClient:
    """A WebSocket connection from ``source`` that claims to be ``forged`` in both headers."""
    headers = {XFF: forged, REAL_IP: forged} if forged else {}
    request = tornado.httpclient.HTTPRequest(f"ws://{PROXY}:{port}/api/v2/generate", headers=headers,
                                             network_interface=source)
    return WSClient(await tornado.websocket.websocket_connect(request))


async def first_reply(client: WSClient) -> dict:
    """The reply to a first message: ``ok`` when the connection was admitted, the refusal when not."""
    try:
        await client.send({"type": "stop"})
    except tornado.websocket.WebSocketClosedError:
        pass  # refused and closed already: the refusal is still there to read
    return await client.receive(timeout=REPLY_TIMEOUT)


async def assert_admitted(client: WSClient) -> None:
    reply = await first_reply(client)
    assert reply is not None and reply["ok"] is True, reply


async def assert_refused(client: WSClient, why: str) -> None:
    reply = await first_reply(client)
    assert reply is not None and reply["ok"] is False and reply["code"] == "too_many_connections", why
    assert await client.receive(timeout=REPLY_TIMEOUT) is None and client.connection.close_code == 1013


@pytest.mark.parametrize("header", [REAL_IP, XFF])
async def test_forged_addresses_through_nginx_count_against_the_peer_nginx_saw(nginx, header):
    port, upstream = nginx(header)
    held = [await connect(port, CLIENT, forged="6.6.6.6")]
    try:
        await assert_admitted(held[0])
        for forged in ("7.7.7.7", "198.51.100.1:5678", "[2001:db8::1]:443", "garbage"):
            held.append(await connect(port, CLIENT, forged))
            await assert_refused(held[-1], f"forging {forged} through nginx made another client")
        # The same peer straight to the server, which does not trust it: the same client.
        held.append(await connect(upstream, CLIENT))
        await assert_refused(held[-1], f"{CLIENT} through nginx did not count as {CLIENT}")
        # Another peer through nginx is another client: its key is not nginx's own address.
        held.append(await connect(port, OTHER_CLIENT, forged="6.6.6.6"))
        await assert_admitted(held[-1])
    finally:
        for client in held:
            client.close()
