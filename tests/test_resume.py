"""Resumable WebSocket sessions on the real swarm: a dropped connection's session waits for its
client, and a new connection continues it where the client stopped reading."""

import asyncio

import pytest

from tests.helpers import wait_for_no_sessions
from tests.ws_client import WSClient

TINY = "tests/tiny-llama"
PROMPT = "Once upon a time"
TOKENS = 24
GENERATE = {"type": "generate", "inputs": PROMPT, "max_new_tokens": 1, "max_length": 4 + TOKENS,
            "stop_sequence": "never written"}


async def open_session(port: int, resumable: bool) -> tuple:
    client = await WSClient.connect(port)
    reply = await client.request({"type": "open_inference_session", "model": TINY, "max_length": 64,
                                  "resumable": resumable})
    assert reply["ok"] is True
    return client, reply


async def test_a_resumed_stream_delivers_every_reply_exactly_once(ws_port, manager):
    plain, opened = await open_session(ws_port, resumable=False)
    assert opened == {"ok": True}  # without the opt-in, nothing changes
    expected = await plain.stream(GENERATE)
    plain.close()
    assert all("seq" not in reply for reply in expected)

    first, opened = await open_session(ws_port, resumable=True)
    assert len(opened["resume_token"]) >= 40 and opened["session_id"]
    await first.send(GENERATE)
    received = [await first.receive() for _ in range(5)]
    first.connection.stream.close()  # the connection drops mid-stream
    await asyncio.sleep(0.3)  # tokens keep coming while nobody listens
    assert manager.open_session_count == 1

    second = await WSClient.connect(ws_port)
    resumed = await second.request({"type": "resume_inference_session", "session_id": opened["session_id"],
                                    "resume_token": opened["resume_token"], "last_seq": received[-1]["seq"]})
    assert resumed["ok"] is True and resumed["resumed"] is True and resumed["latest_seq"] >= 5
    while not received[-1]["stop"]:
        received.append(await second.receive())
    assert [reply["seq"] for reply in received] == list(range(1, len(received) + 1))
    assert "".join(reply["outputs"] for reply in received) == "".join(reply["outputs"] for reply in expected)
    assert sum(reply["token_count"] for reply in received) == TOKENS

    # The session goes on in the new connection.
    more = await second.stream({"type": "generate", "inputs": " The end", "max_new_tokens": 3})
    assert more[-1]["ok"] and more[-1]["seq"] == received[-1]["seq"] + 1
    second.connection.close(1000)  # closed on purpose: the session ends at once
    await wait_for_no_sessions(manager)


async def test_a_wrong_token_is_refused_and_the_grace_period_ends_the_session(ws_port, manager):
    first, opened = await open_session(ws_port, resumable=True)
    first.close()
    await asyncio.sleep(0.2)
    assert manager.open_session_count == 1  # waiting, counted against the client's limits
    assert manager.metrics.registry.get_sample_value("swarm_chat_detached_sessions") == 1

    intruder = await WSClient.connect(ws_port)
    for wrong in ({"session_id": opened["session_id"], "resume_token": opened["resume_token"][:-2] + "xx"},
                  {"session_id": "ws-unknown", "resume_token": opened["resume_token"]}):
        refused = await intruder.request({"type": "resume_inference_session", **wrong})
        assert refused["ok"] is False and refused["code"] == "resume_refused" and refused["retryable"] is False
    refused = await intruder.request({"type": "resume_inference_session", "session_id": opened["session_id"],
                                      "resume_token": opened["resume_token"], "last_seq": 99})
    assert refused["code"] == "resume_refused"  # it claims replies that were never sent
    intruder.close()

    original_grace = manager.resumable.grace
    manager.resumable.grace = 0.5
    try:
        await wait_for_no_sessions(manager, timeout=15)
    finally:
        manager.resumable.grace = original_grace
    late = await WSClient.connect(ws_port)
    refused = await late.request({"type": "resume_inference_session", "session_id": opened["session_id"],
                                  "resume_token": opened["resume_token"]})
    assert refused["code"] == "resume_refused"
    late.close()


@pytest.mark.parametrize("message, error", [
    ({"type": "resume_inference_session", "session_id": "x"}, "session_id and resume_token are required"),
    ({"type": "resume_inference_session", "session_id": "x", "resume_token": "y", "last_seq": -1},
     "last_seq must be at least 0"),
])
async def test_malformed_resume_messages_are_refused(ws_port, message, error):
    client = await WSClient.connect(ws_port)
    reply = await client.request(message)
    assert reply["ok"] is False and reply["code"] == "bad_request" and error in reply["traceback"]
    client.close()
