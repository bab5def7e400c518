"""Operations: /health, /ready, /metrics, the swarm map, and the limits that refuse at once."""

import asyncio
import contextlib
import dataclasses
import json
import threading

import pytest

import swarm.petals_api  # noqa: F401  # isort: skip  (the compatibility patch, before petals and hivemind)
from hivemind import PeerID  # noqa: E402  # isort: skip
from prometheus_client.parser import text_string_to_metric_families
from swarm.local import NODE_THROUGHPUT
from tests.helpers import wait_for_no_sessions
from bench.raw_websocket import CLOSE, TEXT, RawWebSocket
from tests.ws_client import WSClient

TINY = "tests/tiny-llama"
RELEASE_TIMEOUT = 30  # earlier tests' sessions are released in the background


async def get_json(client, path):
    response = await client.fetch(path, raise_error=False)
    return response.code, json.loads(response.body)


async def scrape(client) -> dict:
    """``/metrics`` as {(name, labels...): value}."""
    response = await client.fetch("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


async def post_generate(client, body):
    response = await client.fetch("/api/v1/generate", method="POST", body=json.dumps(body),
                                  headers={"Content-Type": "application/json"}, raise_error=False)
    return response, json.loads(response.body)


@pytest.fixture
def limits(io_loop, manager, monkeypatch):
    """Sets the manager's limits (its admission's and its own) for one test, once earlier tests'
    sessions are released."""
    io_loop.run_sync(lambda: wait_for_no_sessions(manager, RELEASE_TIMEOUT))

    def set_limits(**values):
        monkeypatch.setattr(manager.admission, "settings", dataclasses.replace(manager.admission.settings, **values))
        monkeypatch.setattr(manager, "settings", dataclasses.replace(manager.settings, **values))

    return set_limits


async def test_health_answers_alive(http_server_client):
    code, body = await get_json(http_server_client, "/health")
    assert code == 200 and body["ok"] is True and body["status"] == "alive"


async def test_ready_when_every_model_has_a_full_route(http_server_client, manager):
    code, body = await get_json(http_server_client, "/ready")
    assert code == 200 and body["ready"] is True
    assert [model["model"] for model in body["models"]] == [loaded.spec.key for loaded in manager.registry.models]
    for model, loaded in zip(body["models"], manager.registry.models):
        assert model["ready"] is True and model["missing_blocks"] == []
        # The families' models are split over two nodes.
        assert model["num_blocks"] == loaded.num_blocks
        assert model["online_servers"] == (2 if loaded.spec.family == "Families" else 1)


async def test_not_ready_while_the_executor_is_saturated(http_server_client, manager):
    release = threading.Event()
    threads = manager.executor.workers
    blocked = [manager.executor.run(release.wait) for _ in range(2 * threads + 1)]
    try:
        code, body = await get_json(http_server_client, "/ready")
        assert code == 503 and body["ready"] is False and body["executor"]["saturated"] is True
        assert body["executor"]["waiting_calls"] >= threads + 1  # ours, and any background call
        assert all(model["ready"] for model in body["models"])  # the swarm itself is fine
    finally:
        release.set()
        await asyncio.gather(*blocked)
    for _ in range(100):  # ready again once the queue has drained
        code, body = await get_json(http_server_client, "/ready")
        if code == 200:
            break
        await asyncio.sleep(0.1)
    assert code == 200 and body["executor"]["saturated"] is False


async def test_swarm_map_names_the_peer_of_every_block(http_server_client, manager):
    code, body = await get_json(http_server_client, "/api/v1/swarm")
    assert code == 200 and body["ok"] is True
    peers = []
    for model, loaded in zip(body["models"], manager.registry.models):
        assert model["full_route"] is True and model["missing_blocks"] == [] and model["error"] is None
        # The test swarm runs one node per model, two for each family's model (half of the blocks each).
        half = loaded.num_blocks // 2
        spans = [(0, half), (half, loaded.num_blocks)] if loaded.spec.family == "Families" else [(0, loaded.num_blocks)]
        servers = sorted(model["servers"], key=lambda server: server["start"])
        assert [(server["start"], server["end"], server["state"]) for server in servers] == [
            (start, end, "online") for start, end in spans]
        for server in servers:
            assert server["throughput"] == NODE_THROUGHPUT
            assert PeerID.from_base58(server["peer_id"]).to_base58() == server["peer_id"]
            peers.append(server["peer_id"])
    assert len(set(peers)) == len(peers)


async def test_swarm_page_is_served(http_server_client):
    redirect = await http_server_client.fetch("/swarm", follow_redirects=False, raise_error=False)
    assert redirect.code == 301 and redirect.headers["Location"] == "/swarm.html"
    response = await http_server_client.fetch("/swarm.html")
    assert response.code == 200 and b"Swarm map" in response.body and b"js/swarm.js" in response.body
    script = await http_server_client.fetch("/js/swarm.js")
    assert b"/api/v1/swarm" in script.body


async def test_metrics_count_steps_tokens_sessions_and_errors(http_server_client, ws_port, manager):
    await wait_for_no_sessions(manager, RELEASE_TIMEOUT)  # so that the gauge moves for this test alone
    before = await scrape(http_server_client)
    model = ("model", TINY)
    client = await WSClient.connect(ws_port)
    try:
        assert (await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64}))["ok"]
        during = await scrape(http_server_client)
        assert during[("swarm_chat_open_sessions",)] == before[("swarm_chat_open_sessions",)] + 1
        replies = await client.stream({"type": "generate", "inputs": "Hi there", "max_new_tokens": 5})
        assert replies[-1]["ok"] and replies[-1]["token_count"] == 5
        rejected = await client.request({"type": "generate", "inputs": 5})
        assert rejected["ok"] is False and rejected["code"] == "bad_request"
    finally:
        client.close()
    after = await scrape(http_server_client)

    def grew(*key):
        return after.get(key, 0) - before.get(key, 0)

    assert grew("swarm_chat_generated_tokens_total", model) == 5
    assert grew("swarm_chat_steps_total", model, ("outcome", "ok")) == 5
    assert grew("swarm_chat_step_seconds_count", model) == 5
    assert grew("swarm_chat_input_tokens_total", model) == len(manager.registry.find(TINY).encode("Hi there"))
    assert grew("swarm_chat_sessions_opened_total", model) == 1
    assert grew("swarm_chat_errors_total", ("code", "bad_request")) == 1
    assert ("swarm_chat_executor_queue_depth",) in after


async def test_per_client_session_limit_refuses_at_once(http_server_client, ws_port, manager, limits):
    limits(max_sessions_per_client=2)
    clients = [await WSClient.connect(ws_port) for _ in range(3)]
    try:
        for client in clients[:2]:
            assert (await client.request({"type": "open_inference_session", "model": TINY, "max_length": 32}))["ok"]
        refused = await clients[2].request({"type": "open_inference_session", "model": TINY, "max_length": 32},
                                           timeout=5)
        assert refused["ok"] is False and refused["code"] == "too_many_sessions" and refused["retryable"] is True
        response, body = await post_generate(http_server_client, {"model": TINY, "inputs": "Hi", "max_new_tokens": 1})
        assert response.code == 429 and response.headers["Retry-After"] and body["code"] == "too_many_sessions"
        clients[0].close()
        for _ in range(100):  # the closed connection's session is released in the background
            reply = await clients[2].request({"type": "open_inference_session", "model": TINY, "max_length": 32})
            if reply["ok"]:
                break
            assert reply["code"] == "too_many_sessions"
            await asyncio.sleep(0.1)
        assert reply["ok"] is True
        generated = await clients[2].stream({"type": "generate", "inputs": "Hi", "max_new_tokens": 2})
        assert generated[-1]["ok"] and generated[-1]["token_count"] == 2
    finally:
        for client in clients:
            client.close()


async def test_server_session_limit_answers_busy(http_server_client, ws_port, manager, limits):
    limits(max_sessions=1, queue_timeout=0)  # refused at once, not kept waiting for room
    holder = await WSClient.connect(ws_port)
    other = await WSClient.connect(ws_port)
    try:
        assert (await holder.request({"type": "open_inference_session", "model": TINY, "max_length": 32}))["ok"]
        refused = await other.request({"type": "open_inference_session", "model": TINY, "max_length": 32}, timeout=5)
        assert refused["ok"] is False and refused["code"] == "server_busy" and refused["retryable"] is True
        response, body = await post_generate(http_server_client, {"model": TINY, "inputs": "Hi", "max_new_tokens": 1})
        assert response.code == 503 and response.headers["Retry-After"] and body["code"] == "server_busy"
    finally:
        holder.close()
        other.close()


async def test_max_new_tokens_is_capped_per_model(http_server_client, ws_port, manager):
    limit = manager.registry.find(TINY).spec.max_new_tokens_limit
    response, body = await post_generate(http_server_client,
                                         {"model": TINY, "inputs": "Hi", "max_new_tokens": limit + 1})
    assert response.code == 400 and body["code"] == "invalid_request" and str(limit) in body["traceback"]
    client = await WSClient.connect(ws_port)
    try:
        assert (await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64}))["ok"]
        refused = await client.request({"type": "generate", "inputs": "Hi", "max_new_tokens": limit + 1})
        assert refused["ok"] is False and refused["code"] == "invalid_request"
        replies = await client.stream({"type": "generate", "inputs": "Hi", "max_new_tokens": 2})
        assert replies[-1]["ok"] and replies[-1]["token_count"] == 2  # the session is still usable
    finally:
        client.close()


async def test_connections_per_client_are_capped_sessions_or_not(ws_port, manager, limits):
    limits(max_connections_per_client=3)
    held = [await WSClient.connect(ws_port) for _ in range(3)]  # none of them opens a session
    try:
        refused = await WSClient.connect(ws_port)
        reply = await refused.receive(timeout=5)
        assert reply["ok"] is False and reply["code"] == "too_many_connections" and reply["retryable"] is True
        assert await refused.receive(timeout=5) is None and refused.connection.close_code == 1013
        held.pop().close()
        for _ in range(50):  # the closed connection's place comes back once the server sees the close
            again = await WSClient.connect(ws_port)
            reply = await again.request({"type": "stop"}, timeout=5)
            if reply is not None and reply["ok"]:
                break
            again.close()
            await asyncio.sleep(0.1)
        assert reply["ok"] is True
        held.append(again)
    finally:
        for client in held:
            client.close()


async def test_a_refused_connection_that_ignores_the_close_is_served_nothing(ws_port, manager, limits):
    limits(max_connections_per_client=1)
    held = await WSClient.connect(ws_port)
    refused = await RawWebSocket.connect(ws_port)
    try:
        opcode, payload = await refused.receive_frame()
        assert opcode == TEXT and json.loads(payload)["code"] == "too_many_connections"
        assert (await refused.receive_frame())[0] == CLOSE
        # It does not answer the close and asks for a session all the same.
        await refused.send({"type": "open_inference_session", "model": TINY, "max_length": 32, "resumable": True})
        await refused.send({"type": "stop"})
        with contextlib.suppress(asyncio.TimeoutError):  # silence, or the server drops the socket
            assert await refused.receive_frame(timeout=2) is None, "a refused connection was answered"
        assert manager.open_session_count == 0
    finally:
        refused.close()
        held.close()


async def test_messages_over_the_rate_are_not_dropped_but_read_no_faster_than_the_rate(ws_port, manager, limits):
    limits(max_messages_per_second=5.0)  # bursts of 10
    client = await WSClient.connect(ws_port)
    try:
        for _ in range(20):
            await client.send({"type": "stop"})
        loop = asyncio.get_running_loop()
        replies, started = [await client.receive(timeout=10)], loop.time()
        replies += [await client.receive(timeout=10) for _ in range(19)]
        assert all(reply["ok"] for reply in replies)  # every one answered, none dropped
        # The first 10 came at once; the other 10 no faster than 5 a second.
        assert loop.time() - started >= 0.9 * 10 / 5
    finally:
        client.close()


async def test_one_client_s_connections_share_a_budget_of_bytes_per_second(ws_port, manager, limits):
    limits(max_client_bytes_per_second=20_000, max_messages_per_second=100.0)
    clients = [await WSClient.connect(ws_port) for _ in range(2)]
    padded = {"type": "stop", "padding": "x" * 10_000}
    try:
        for client in clients:
            for _ in range(3):
                await client.send(padded)
        loop = asyncio.get_running_loop()
        started = loop.time()
        replies = [await client.receive(timeout=10) for client in clients for _ in range(3)]
        assert all(reply["ok"] for reply in replies)
        # 60 KB from one client at 20 KB a second, the first 20 KB at once.
        assert loop.time() - started >= 0.9 * 40_000 / 20_000
    finally:
        for client in clients:
            client.close()


async def test_session_state_memory_is_measured_and_budgeted(http_server_client, ws_port, manager, monkeypatch):
    per_token = manager.registry.find(TINY).state_bytes_per_token
    prompt_tokens = len(manager.registry.find(TINY).encode("A cat sat on"))
    client = await WSClient.connect(ws_port)
    assert (await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64}))["ok"]
    replies = await client.stream({"type": "generate", "inputs": "A cat sat on", "max_new_tokens": 5})
    generated = sum(reply["token_count"] for reply in replies)
    metrics = await scrape(http_server_client)
    # The last token chosen is not fed through the swarm until the next step.
    assert metrics[("swarm_chat_session_state_bytes",)] == (prompt_tokens + generated - 1) * per_token
    assert metrics[("swarm_chat_session_state_reserved_bytes",)] == 64 * per_token  # one span
    assert metrics[("swarm_chat_session_state_budget_bytes",)] == manager.admission.memory_budget

    monkeypatch.setattr(manager.admission, "memory_budget", 100 * per_token)
    monkeypatch.setattr(manager, "settings", dataclasses.replace(manager.settings, queue_timeout=0))  # no waiting
    second = await WSClient.connect(ws_port)
    refused = await second.request({"type": "open_inference_session", "model": TINY, "max_length": 64})
    assert refused["ok"] is False and refused["code"] == "memory_budget_exceeded" and refused["retryable"]
    assert (await second.request({"type": "open_inference_session", "model": TINY, "max_length": 32}))["ok"]
    assert (await client.stream({"type": "generate", "inputs": " and", "max_new_tokens": 2}))[-1]["ok"]
    client.close()
    second.close()
    await wait_for_no_sessions(manager)
    metrics = await scrape(http_server_client)
    assert metrics[("swarm_chat_session_state_bytes",)] == metrics[("swarm_chat_session_state_reserved_bytes",)] == 0
