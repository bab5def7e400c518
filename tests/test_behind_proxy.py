"""Behind a real nginx: the client a connection counts against is the peer nginx saw, whatever
address the client forges in X-Forwarded-For or X-Real-IP; and the documented deployment
(docs/deploy/nginx.conf, with TLS) carries the WebSocket API and streamed /v1 replies.

nginx runs as a child process with its own configuration in the test's folder. The test server
trusts nginx (127.0.0.1) and allows one WebSocket connection per client; the test's clients
connect from other loopback addresses (127.0.0.2, 127.0.0.3), so that "same client" (the second
is refused) and "another client" (admitted) tell which key each connection got.

The documented systemd unit (docs/deploy/swarm-chat.service) is checked too: its command line is
one the server accepts, and systemd-analyze, where installed, finds nothing wrong in it.
"""

import configparser
import dataclasses
import datetime
import getpass
import grp
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Tuple

import pytest
import tornado.httpclient
import tornado.websocket

from config import build_parser
from tests.ws_client import WSClient

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "docs" / "deploy"

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
# What nginx needs around a site when it runs as a test's child: everything in the test's folder.
NGINX_WRAPPER = """
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
    include {site};
}}
"""
FORWARDING_SITE = """
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
"""


def nginx_binary() -> str:
    """nginx's path; it lives in /usr/sbin, often not on a user's PATH."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    binary = shutil.which("nginx", path=search)
    if binary is None:
        pytest.fail("nginx is not installed: `make test` installs it (Debian package nginx)")
    return binary


def start_nginx(binary: str, folder: Path, site: str, port: int) -> subprocess.Popen:
    """nginx serving ``site`` (a ``server`` block) from ``folder``, once it listens on ``port``;
    ``stop_nginx`` it after the test."""
    (folder / "site.conf").write_text(site)
    config = folder / "nginx.conf"
    config.write_text(NGINX_WRAPPER.format(folder=folder, site=folder / "site.conf"))
    process = subprocess.Popen([binary, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(config)])
    try:
        wait_until_listening(process, port, folder / "error.log")
    except BaseException:
        stop_nginx(process)
        raise
    return process


def stop_nginx(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
        site = FORWARDING_SITE.format(proxy=PROXY, port=port, upstream=upstream, sets_header=SETS_HEADER[header])
        processes.append(start_nginx(binary, tmp_path, site, port))
        return port, upstream

    yield start
    for process in processes:
        stop_nginx(process)


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


# --- The documented deployment: docs/deploy/nginx.conf with TLS ---------------------------------

PLACEHOLDER = re.compile(r"@[A-Z_]+@")
DOCUMENTED_BODY_LIMIT = 1024 * 1024  # client_max_body_size 1m


def self_signed_certificate(folder: Path) -> Tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files, made for this test only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PROXY)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(PROXY))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certificate_path, key_path = folder / "certificate.pem", folder / "key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return certificate_path, key_path


@pytest.fixture
def documented_nginx(serve_with, tmp_path):
    """(nginx's HTTPS port, the certificate to trust): docs/deploy/nginx.conf as written, its
    placeholders filled in, in front of a server started as the systemd unit starts it."""
    binary = nginx_binary()
    upstream = serve_with(trusted_proxies=(PROXY,), max_body_bytes=DOCUMENTED_BODY_LIMIT)
    certificate, key = self_signed_certificate(tmp_path)
    https_port, http_port = free_port(PROXY), free_port(PROXY)
    values = {"@SERVER_NAME@": PROXY, "@HTTP_LISTEN@": f"{PROXY}:{http_port}",
              "@HTTPS_LISTEN@": f"{PROXY}:{https_port}", "@CERTIFICATE@": str(certificate),
              "@CERTIFICATE_KEY@": str(key), "@UPSTREAM@": f"{PROXY}:{upstream}"}
    site = (DEPLOY / "nginx.conf").read_text()
    assert set(PLACEHOLDER.findall(site)) == set(values), "the placeholders the file names are the ones filled in"
    for placeholder, value in values.items():
        site = site.replace(placeholder, value)
    process = start_nginx(binary, tmp_path, site, https_port)
    try:
        yield https_port, certificate
    finally:
        stop_nginx(process)


async def test_documented_nginx_carries_the_websocket_api_over_tls(documented_nginx):
    port, certificate = documented_nginx
    page = f"https://{PROXY}:{port}"

    async def connect(origin: str) -> WSClient:
        request = tornado.httpclient.HTTPRequest(f"wss://{PROXY}:{port}/api/v2/generate",
                                                 headers={"Origin": origin}, ca_certs=str(certificate))
        return WSClient(await tornado.websocket.websocket_connect(request))

    # As the server's own chat page (its Origin is the address nginx serves, which the server
    # learns from Host): even a model kept off the public APIs is served.
    client = await connect(page)
    try:
        opened = await client.request({"type": "open_inference_session", "model": "tests/tiny-bloom",
                                       "max_length": 64})
        assert opened["ok"] is True, opened
        # Token by token until told to stop: the replies come through the upgraded connection.
        await client.send({"type": "generate", "inputs": "Hello", "max_new_tokens": 1,
                           "stop_sequence": "never-appears"})
        streamed = [await client.receive(), await client.receive()]
        assert all(reply["ok"] and reply["stop"] is False for reply in streamed), streamed
        await client.send({"type": "stop"})
        while streamed[-1]["stop"] is False:
            streamed.append(await client.receive())
            assert streamed[-1]["ok"] is True, streamed
    finally:
        client.close()
    # Another site's page does not pass for the server's own through the proxy.
    client = await connect("https://elsewhere.example")
    try:
        refused = await client.request({"type": "open_inference_session", "model": "tests/tiny-bloom",
                                        "max_length": 64})
        assert refused["ok"] is False and refused["code"] == "model_not_public", refused
    finally:
        client.close()


async def test_documented_nginx_streams_v1_events_as_they_come(documented_nginx):
    port, certificate = documented_nginx
    arrivals = []
    body = {"model": "smollm2", "stream": True, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from one to twenty."}]}
    request = tornado.httpclient.HTTPRequest(
        f"https://{PROXY}:{port}/v1/chat/completions", method="POST", body=json.dumps(body),
        headers={"Content-Type": "application/json"}, ca_certs=str(certificate), request_timeout=120,
        streaming_callback=lambda chunk: arrivals.append((time.monotonic(), chunk)))
    response = await tornado.httpclient.AsyncHTTPClient().fetch(request)
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    text = b"".join(chunk for _, chunk in arrivals).decode()
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3, text
    # Unbuffered: the events came in several pieces, spread over the generation, not all at its end.
    assert len(arrivals) > 2, arrivals
    assert arrivals[-1][0] - arrivals[0][0] > 0.05, arrivals


async def test_documented_nginx_refuses_a_body_over_the_limit(documented_nginx):
    port, certificate = documented_nginx
    request = tornado.httpclient.HTTPRequest(
        f"https://{PROXY}:{port}/api/v1/generate", method="POST", body=b"x" * (DOCUMENTED_BODY_LIMIT + 1),
        headers={"Content-Type": "application/json"}, ca_certs=str(certificate), request_timeout=60)
    response = await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code == 413


def test_documented_nginx_limit_is_the_servers():
    """client_max_body_size, the unit's --max-body-bytes and the server's default agree."""
    site = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"^\s*client_max_body_size 1m;", site, re.M)
    arguments = build_parser(environ={}).parse_args(unit_command()[2:])
    assert arguments.max_body_bytes == DOCUMENTED_BODY_LIMIT == build_parser(environ={}).parse_args([]).max_body_bytes


# --- The documented systemd unit -------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def unit_command() -> list:
    return shlex.split(read_unit(DEPLOY / "swarm-chat.service")["Service"]["ExecStart"])


def test_documented_unit_runs_the_server_behind_the_proxy():
    unit = read_unit(DEPLOY / "swarm-chat.service")
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    command = unit_command()
    assert command[0].endswith("/.venv/bin/python") and command[1] == "server.py", command
    assert Path(unit["Service"]["WorkingDirectory"]) == Path(command[0]).parent.parent.parent
    parser = build_parser(environ={})
    parser.exit_on_error = False
    arguments = parser.parse_args(command[2:])  # the server's own parser accepts the command line
    assert arguments.host == "127.0.0.1" and PROXY in arguments.trusted_proxies
    assert not arguments.debug
    assert unit["Service"]["KillSignal"] == "SIGTERM" and unit["Service"]["KillMode"] == "mixed"


def test_documented_unit_passes_systemd_analyze(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # As installed here: this checkout, this Python and this user instead of the file's examples.
    text = (DEPLOY / "swarm-chat.service").read_text()
    working_directory = read_unit(DEPLOY / "swarm-chat.service")["Service"]["WorkingDirectory"]
    text = text.replace(working_directory, str(REPO_ROOT))
    text = re.sub(r"^User=.*$", f"User={getpass.getuser()}", text, flags=re.M)
    text = re.sub(r"^Group=.*$", f"Group={grp.getgrgid(os.getgid()).gr_name}", text, flags=re.M)
    unit = tmp_path / "swarm-chat.service"
    unit.write_text(text)
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (verified.stdout + verified.stderr).splitlines()
                  if "swarm-chat.service" in line]
    assert verified.returncode == 0 and not complaints, verified.stdout + verified.stderr
