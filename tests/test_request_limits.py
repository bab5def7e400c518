"""The stateless APIs' requests against their client's limits, on a fake model: a request's place
is taken before its body is read, and its reply never waits for the swarm to let go of it.

Generation itself is proven on the real swarm elsewhere; the last test here checks on it that
prompts are tokenized apart from the steps.
"""

import asyncio
import dataclasses
import json
import threading

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.simple_httpclient
import tornado.testing

import sessions.serving.admission as admission_module
from config import Settings
from server import make_app
from sessions.engine.executor import BlockingExecutor
from sessions.serving.admission import MAX_SLOWED_REQUESTS, REFUSALS_PER_SECOND, Admission
from tests.fakes import FakeTokenStream, fake_manager
from tests.helpers import send_raw_post, wait_for_no_sessions

TINY = "tests/tiny-llama"
# Sessions are closed after each request, not kept warm for the next.
NOT_KEPT = Settings(warm_sessions=0)


@pytest.fixture
def fake_server(io_loop):
    """``await fake_server(settings, streams)``: the port of the real app over a fake manager whose
    sessions each take the next stream of ``streams`` (a list the test fills)."""
    started = []

    async def serve(settings: Settings, streams: list):
        executor = BlockingExecutor(2, "fake")
        manager = fake_manager(executor, settings, lambda model, max_length: streams.pop(0))
        await manager.start()
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(make_app(Settings(models=()), manager))
        server.add_socket(sock)
        started.append((server, manager))
        return port, manager

    yield serve
    for server, manager in started:
        server.stop()
        io_loop.run_sync(server.close_all_connections)
        io_loop.run_sync(lambda: manager.close(grace=1))


async def post_generate(port: int, body: dict):
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/api/v1/generate", method="POST", body=json.dumps(body),
        headers={"Content-Type": "application/json"}, raise_error=False, request_timeout=10)
    return response.code, json.loads(response.body)


async def test_the_reply_is_written_before_the_swarm_session_is_released(fake_server):
    hung = FakeTokenStream("abc")
    hung.hold_close.clear()  # the swarm never confirms the release, as a hung server would
    port, manager = await fake_server(NOT_KEPT, [hung])
    code, reply = await post_generate(port, {"inputs": "x", "max_new_tokens": 3})
    assert code == 200 and reply["outputs"] == "abc"
    assert manager.open_session_count == 1 and not hung.closed  # still being released, in the background
    hung.hold_close.set()
    await wait_for_no_sessions(manager)


async def test_requests_in_flight_count_against_their_client_before_their_body_is_read(fake_server):
    port, manager = await fake_server(dataclasses.replace(NOT_KEPT, max_sessions_per_client=2),
                                      [FakeTokenStream("ok")])
    body = json.dumps({"inputs": "x", "max_new_tokens": 2}).encode()
    uploading = []
    for _ in range(2):  # bodies announced and never sent in full
        _, writer = await send_raw_post(port, "/api/v1/generate", body[:5], length=len(body))
        uploading.append(writer)
    await asyncio.sleep(0.2)
    code, reply = await post_generate(port, {"inputs": "x", "max_new_tokens": 2})
    assert code == 429 and reply["code"] == "too_many_requests" and reply["retryable"] is True
    for writer in uploading:  # the clients give up: their places come back
        writer.close()
    for _ in range(50):
        code, reply = await post_generate(port, {"inputs": "x", "max_new_tokens": 2})
        if code != 429:
            break
        await asyncio.sleep(0.1)
    assert code == 200 and reply["outputs"] == "ok"


async def test_a_request_whose_client_leaves_mid_generation_gives_its_place_back(fake_server):
    held = FakeTokenStream("a" * 50)
    held.hold.clear()  # its first step waits
    port, manager = await fake_server(dataclasses.replace(NOT_KEPT, max_sessions_per_client=1),
                                      [held, FakeTokenStream("ok")])
    body = json.dumps({"inputs": "x", "max_new_tokens": 40}).encode()
    _, writer = await send_raw_post(port, "/api/v1/generate", body)
    while not held.steps_running:
        await asyncio.sleep(0.01)
    writer.close()  # gone while its generation runs
    await asyncio.sleep(0.2)
    held.hold.set()
    await wait_for_no_sessions(manager)
    code, reply = await post_generate(port, {"inputs": "x", "max_new_tokens": 2})
    assert code == 200 and reply["outputs"] == "ok"


async def test_prompts_are_tokenized_apart_from_the_steps(http_server_client, manager, monkeypatch):
    loaded = manager.registry.find(TINY)
    threads = []
    original = loaded.encode

    def encode(text):
        threads.append(threading.current_thread().name)
        return original(text)

    monkeypatch.setattr(loaded, "encode", encode)
    response = await http_server_client.fetch("/api/v1/generate", method="POST", raise_error=False,
                                              body=json.dumps({"model": TINY, "inputs": "Hi", "max_new_tokens": 2}),
                                              headers={"Content-Type": "application/json"})
    assert response.code == 200
    assert threads and all(name.startswith("tokenize") for name in threads), threads
    await wait_for_no_sessions(manager)


def test_a_client_refused_too_often_waits_its_turn_and_at_most_so_many_wait():
    admission = Admission(Settings())
    assert admission.refusal_wait("client") == 0.0
    for _ in range(int(2 * REFUSALS_PER_SECOND)):  # the burst
        admission.refused("client")
    assert admission.refusal_wait("client") == 0.0
    admission.refused("client")
    first, second = admission.refusal_wait("client"), admission.refusal_wait("client")
    assert 0 < first < second  # each waiting request takes the next turn
    assert admission.refusal_wait("another client") == 0.0
    slots = [admission.slowed("client") for _ in range(MAX_SLOWED_REQUESTS)]
    assert admission.refusal_wait("client") is None  # closed unread
    slots[0].release()
    assert admission.refusal_wait("client") > 0


async def test_a_flood_of_refused_requests_is_read_at_a_polite_pace(fake_server):
    port, manager = await fake_server(NOT_KEPT, [])

    async def refused(count: int) -> None:
        replies = await asyncio.gather(*(post_generate(port, {"inputs": "x"}) for _ in range(count)))
        assert all(code == 400 and reply["code"] == "bad_request" for code, reply in replies)

    await refused(int(2 * REFUSALS_PER_SECOND) + 1)  # the burst, and one more: now the client owes
    loop = asyncio.get_running_loop()
    started = loop.time()
    await refused(5)
    # Each is read in its turn, one every 1 / REFUSALS_PER_SECOND seconds at best.
    assert loop.time() - started >= 0.9 * 5 / REFUSALS_PER_SECOND


async def test_past_the_most_waiting_requests_a_refused_client_s_connections_are_closed_unread(fake_server,
                                                                                              monkeypatch):
    monkeypatch.setattr(admission_module, "MAX_SLOWED_REQUESTS", 0)
    port, manager = await fake_server(NOT_KEPT, [FakeTokenStream("ok")])
    for _ in range(int(2 * REFUSALS_PER_SECOND) + 1):
        assert (await post_generate(port, {"inputs": "x"}))[0] == 400
    with pytest.raises(tornado.simple_httpclient.HTTPStreamClosedError):  # closed without an answer
        await post_generate(port, {"inputs": "x"})
    await asyncio.sleep(0.5)  # it owes nothing any more once its turn has come
    code, reply = await post_generate(port, {"inputs": "x", "max_new_tokens": 2})
    assert code == 200 and reply["outputs"] == "ok"
