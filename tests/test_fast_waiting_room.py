"""A full server lets new sessions wait in line instead of refusing them: each API tells the client
its place as it can (a WebSocket reply, an SSE comment), a client that leaves gives its place
up, and a session not admitted within ``--queue-timeout`` is refused as before. On fakes; the
64-sessions-on-32 check runs on the real swarm in bench/fairness.py."""

import asyncio
import json
import time

import tornado.httpclient

from tests.helpers import wait_for_no_sessions

OPEN = {"type": "open_inference_session", "max_length": 16}


async def hold_the_only_place(server):
    held = await server.websocket()
    assert (await held.request(OPEN))["ok"]
    return held


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_websocket_session_waits_for_room_and_hears_its_place(serve_fakes):
    server = await serve_fakes(max_sessions=1)
    held = await hold_the_only_place(server)
    first, second = await server.websocket(), await server.websocket()
    await first.send(dict(OPEN, queue_updates=True, id="first"))
    assert await first.receive() == {"ok": True, "queued": True, "position": 1, "id": "first"}
    await second.send(dict(OPEN, queue_updates=True, id="second"))
    assert await second.receive() == {"ok": True, "queued": True, "position": 2, "id": "second"}
    assert server.manager.metrics.registry.get_sample_value("swarm_chat_waiting_sessions") == 2
    held.close()
    assert await first.receive() == {"ok": True, "id": "first"}  # admitted once the place was given back
    assert await second.receive() == {"ok": True, "queued": True, "position": 1, "id": "second"}
    first.close()
    assert await second.receive() == {"ok": True, "id": "second"}
    replies = await second.stream({"type": "generate", "inputs": "Hi", "max_new_tokens": 2})
    assert replies[-1]["stop"] is True


async def test_a_client_without_queue_updates_hears_only_the_open_s_reply(serve_fakes):
    server = await serve_fakes(max_sessions=1)
    held = await hold_the_only_place(server)
    waiting = await server.websocket()
    await waiting.send(OPEN)
    await wait_until(lambda: server.manager.waiting_room.waiting == 1)
    held.close()
    assert await waiting.receive() == {"ok": True}


async def test_an_http_request_is_served_once_room_frees_and_a_stream_says_its_place_first(serve_fakes):
    server = await serve_fakes(max_sessions=1)
    held = await hold_the_only_place(server)
    waiting = asyncio.ensure_future(server.fetch("/v1/completions", method="POST", body={
        "model": "fake/chat", "prompt": "ab", "max_tokens": 3, "stream": True}))
    await wait_until(lambda: server.manager.waiting_room.waiting == 1)
    held.close()
    response = await waiting
    assert response.code == 200
    body = response.body.decode()
    assert body.startswith(": queued, position 1\n\ndata: {")
    assert body.endswith("data: [DONE]\n\n")


async def test_a_session_not_admitted_in_time_is_refused(serve_fakes):
    server = await serve_fakes(max_sessions=1, queue_timeout=0.3)
    held = await hold_the_only_place(server)
    started = time.monotonic()
    response = await server.fetch("/api/v1/generate", method="POST", body={"inputs": "Hi", "max_new_tokens": 2})
    reply = json.loads(response.body)
    assert response.code == 503 and reply["code"] == "server_busy" and "waited 0.3 s for room" in reply["traceback"]
    assert time.monotonic() - started >= 0.3


async def test_a_client_that_leaves_while_it_waits_gives_up_its_place(serve_fakes):
    server = await serve_fakes(max_sessions=1)  # its sessions would wait 30 s
    held = await hold_the_only_place(server)
    leaving = await server.websocket()
    await leaving.send(dict(OPEN, queue_updates=True))
    assert (await leaving.receive())["position"] == 1
    leaving.close()
    await wait_until(lambda: server.manager.waiting_room.waiting == 0)
    leaving_http = asyncio.ensure_future(tornado.httpclient.AsyncHTTPClient().fetch(
        server.url("/api/v1/generate"), method="POST", body=json.dumps({"inputs": "Hi", "max_new_tokens": 2}),
        headers={"Content-Type": "application/json"}, request_timeout=0.5))  # then it hangs up
    await wait_until(lambda: server.manager.waiting_room.waiting == 1)
    try:
        await leaving_http
    except tornado.httpclient.HTTPClientError:
        pass
    await wait_until(lambda: server.manager.waiting_room.waiting == 0)
    held.close()
    await wait_for_no_sessions(server.manager)


async def test_the_line_is_bounded_per_client_and_in_all(serve_fakes):
    server = await serve_fakes(max_sessions=1, max_sessions_per_client=2, queue_size=8)
    held = await hold_the_only_place(server)
    waiting = [await server.websocket() for _ in range(2)]
    for client in waiting:
        await client.send(OPEN)
    await wait_until(lambda: server.manager.waiting_room.waiting == 2)
    refused = await server.websocket()
    reply = await refused.request(OPEN)
    assert reply["code"] == "server_busy" and "already has 2 sessions waiting" in reply["traceback"]
    held.close()
    assert await waiting[0].receive() == {"ok": True}
