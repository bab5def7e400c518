"""server.py as users run it: embedded swarm, "ready" with a URL, clean exit on a signal."""

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from tests.conftest import REPO_ROOT
from tests.ws_client import WSClient

READY_TIMEOUT = 180
READY_LINE = re.compile(r"ready: (http://\S+)")


def read_until_ready(process) -> tuple:
    """The server's log up to its "ready" line, and the URL it names."""
    lines = []
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = READY_LINE.search(line)
        if match:
            return match.group(1), lines
    raise AssertionError("server never logged ready:\n" + "".join(lines[-40:]))


async def streaming_client(port: int) -> WSClient:
    client = await WSClient.connect(port)
    assert (await client.request({"type": "open_inference_session", "max_length": 1000}))["ok"]
    await client.send({"type": "generate", "inputs": "Once", "max_new_tokens": 1, "stop_sequence": "never-appears"})
    assert (await client.receive())["stop"] is False
    return client


async def read_until_closed(client: WSClient) -> tuple:
    while await client.receive(timeout=30) is not None:
        pass
    return client.connection.close_code, client.connection.close_reason


def test_embedded_swarm_serves_and_stops_cleanly(tiny_model_specs):
    """Ctrl-C (SIGINT) here; SIGTERM in the joined-swarm test below."""
    tiny_llama = tiny_model_specs[0]
    process = subprocess.Popen(
        [sys.executable, "server.py", "--model", str(tiny_llama.path), "--port", "0", "--host", "127.0.0.1",
         "--swarm-threads", "1"],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        url, log = read_until_ready(process)
        assert any("Blocks announced for tiny-llama-hf: 4/4" in line for line in log)
        assert any("start-up objects out of garbage collection" in line for line in log)
        with urllib.request.urlopen(url + "api/v1/models", timeout=10) as response:
            body = json.load(response)
        assert [entry["model"] for entry in body["models"]] == ["tiny-llama"]
        children = psutil.Process(process.pid).children(recursive=True)
        assert any("swarm" in " ".join(child.cmdline()) for child in children)

        # A client in the middle of a stream when the server is told to stop.
        loop = asyncio.new_event_loop()
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        client = loop.run_until_complete(streaming_client(port))
        process.send_signal(signal.SIGINT)
        close_code, close_reason = loop.run_until_complete(read_until_closed(client))
        loop.close()
        assert (close_code, close_reason) == (1001, "Server shutting down")

        _, remaining_log = process.communicate(timeout=60)
        assert process.returncode == 0, remaining_log[-3000:]
        assert "Closed the session" in remaining_log  # the stream's swarm session was released
        assert "Local swarm stopped" in remaining_log
        _, alive = psutil.wait_procs(children, timeout=10)
        assert [child for child in alive if child.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def short_streams(port: int, count: int) -> None:
    for _ in range(count):
        client = await WSClient.connect(port)
        assert (await client.request({"type": "open_inference_session", "max_length": 64}))["ok"]
        replies = await client.stream({"type": "generate", "inputs": "Once", "max_new_tokens": 1,
                                       "stop_sequence": "never-appears", "max_length": 12})
        assert replies[-1]["ok"] and replies[-1]["stop"]
        client.close()


def test_a_server_that_joined_a_swarm_stops_promptly(tiny_model_specs, local_swarm):
    """The production mode (``--initial-peers``): shutdown after serving streams takes bounded time,
    whatever petals finalizes while the process winds down."""
    process = subprocess.Popen(
        [sys.executable, "server.py", "--model", str(tiny_model_specs[0].path), "--port", "0", "--host", "127.0.0.1",
         "--initial-peers", *local_swarm.initial_peers],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        url, _ = read_until_ready(process)
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        loop = asyncio.new_event_loop()
        loop.run_until_complete(short_streams(port, 8))
        client = loop.run_until_complete(streaming_client(port))  # one stream still in flight
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        loop.run_until_complete(read_until_closed(client))
        loop.close()
        _, remaining_log = process.communicate(timeout=45)
        assert process.returncode == 0, remaining_log[-3000:]
        assert time.monotonic() - started < 45
        assert "Stopped" in remaining_log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
