"""The WebSocket API's protocol on fakes: the real app and session manager over a fake model whose
streams answer a set text one character per token (``tests.fakes``), so that each reply's shape,
each error and each limit can be checked in milliseconds. That the text is the model's own is
proven on the real swarm in test_websocket.py and test_resume.py.
"""

import asyncio
import json

import pytest

from sessions.serving.admission import MAX_WAITING_GENERATIONS
from tests.fakes import chat_model
from tests.helpers import wait_for_no_sessions

OPEN = {"type": "open_inference_session", "max_length": 64}


def generate(inputs=None, **fields) -> dict:
    return {"type": "generate", **({"inputs": inputs} if inputs is not None else {}), **fields}


def fed_text(stream) -> str:
    """What the session fed its stream, as text (one character per token)."""
    return "".join(chr(token) for token in stream.fed)


async def test_a_session_opens_and_a_generation_answers_its_new_text_in_one_reply(serve_fakes):
    server = await serve_fakes(reply="hello world")
    client = await server.websocket()
    assert await client.request(dict(OPEN, model="fake/chat")) == {"ok": True}
    assert await client.request(generate("Hi", max_new_tokens=5)) == {
        "ok": True, "outputs": "hello", "stop": True, "token_count": 5, "session_length": len("Hi") + 5}
    # The session goes on: only the new text is sent, and max_length counts the whole session.
    assert await client.request(generate("!", max_length=10)) == {
        "ok": True, "outputs": " w", "stop": True, "token_count": 2, "session_length": 10}
    assert fed_text(server.streams[0]).startswith("Hihello!")  # the reply's tokens stay in the conversation
    client.close()
    await wait_for_no_sessions(server.manager)


async def test_a_model_is_found_by_an_alias_and_the_first_one_serves_when_none_is_named(serve_fakes):
    first, second = chat_model("fake/first"), chat_model("fake/second", aliases=("second",))
    server = await serve_fakes(models=[first, second])
    for name in (None, "second", "fake/second", "fake/first"):
        client = await server.websocket()
        assert (await client.request(dict(OPEN, **({"model": name} if name else {}))))["ok"]
        client.close()
    assert server.opened == [("fake/first", 64), ("fake/second", 64), ("fake/second", 64), ("fake/first", 64)]


async def test_a_stream_sends_one_reply_per_token_until_the_stop_sequence(serve_fakes):
    server = await serve_fakes(reply="Paris.<|im_end|>Next turn")
    client = await server.websocket()
    assert (await client.request(OPEN))["ok"]
    replies = await client.stream(generate("Q?", max_new_tokens=1, stop_sequence="<|im_end|>"))
    assert [reply["stop"] for reply in replies] == [False] * (len(replies) - 1) + [True]
    assert all(reply["ok"] and reply["token_count"] == 1 for reply in replies)
    assert "".join(reply["outputs"] for reply in replies) == "Paris.<|im_end|>"  # outputs: the raw text
    assert "session_length" not in replies[0] and replies[-1]["session_length"] == len("Q?Paris.<|im_end|>")
    # max_new_tokens is each reply's size; the next turn continues the conversation.
    replies = await client.stream(generate(max_new_tokens=2, stop_sequence="tur"))
    assert [reply["outputs"] for reply in replies] == ["Ne", "xt", " t", "ur"]
    assert [reply["stop"] for reply in replies] == [False, False, False, True]
    client.close()


async def test_visible_text_holds_back_what_may_begin_a_stop_sequence_and_cuts_it(serve_fakes):
    server = await serve_fakes(reply="Paris. <|im_end|>")
    client = await server.websocket()
    await client.request(OPEN)
    replies = await client.stream(generate("Q?", max_new_tokens=1, stop_sequence="<|im_end|>", visible_text=True))
    assert "".join(reply["text"] for reply in replies) == "Paris. "
    assert "".join(reply["outputs"] for reply in replies) == "Paris. <|im_end|>"
    assert all("<" not in reply["text"] for reply in replies)
    client.close()


async def test_extra_stop_sequences_end_the_turn_too(serve_fakes):
    server = await serve_fakes(reply="one, two. three")
    client = await server.websocket()
    await client.request(OPEN)
    replies = await client.stream(generate("Q", max_new_tokens=1, stop_sequence="#", extra_stop_sequences=["two"]))
    assert replies[-1]["stop"] is True and "".join(reply["outputs"] for reply in replies).endswith("two")
    client.close()


async def test_a_stop_message_ends_the_running_generation_and_the_session_goes_on(serve_fakes):
    server = await serve_fakes(reply="a" * 2000, step_seconds=0.005)
    client = await server.websocket()
    await client.request(OPEN)
    await client.send(generate("x", max_new_tokens=1, stop_sequence="never written", max_length=2000))
    assert (await client.receive())["stop"] is False
    await client.send({"type": "stop"})
    replies = [await client.receive()]
    while not replies[-1]["stop"]:
        replies.append(await client.receive())
    assert all(reply["ok"] for reply in replies) and len(replies) < 50  # far from the 1999 tokens asked for
    assert (await client.request(generate("y", max_new_tokens=2)))["outputs"] == "aa"
    # With nothing running, a stop is answered with an empty final reply.
    assert await client.request({"type": "stop"}) == {"ok": True, "outputs": "", "stop": True, "token_count": 0}
    client.close()


async def test_closing_the_connection_mid_stream_closes_the_session(serve_fakes):
    server = await serve_fakes(reply="a" * 2000, step_seconds=0.005)
    client = await server.websocket()
    await client.request(OPEN)
    await client.send(generate("x", max_new_tokens=1, stop_sequence="never written", max_length=2000))
    assert (await client.receive())["stop"] is False
    assert server.manager.open_session_count == 1
    client.close()
    await wait_for_no_sessions(server.manager)
    assert server.streams[0].closed
    assert not [name for name in server.manager.task_names if name.startswith("generate-")]


LIMITED = chat_model(max_new_tokens_limit=8)


@pytest.mark.parametrize("before, message, code, expected", [
    ([], "{not json", "bad_request", "not valid JSON"),
    ([], "[1, 2]", "bad_request", "JSON object"),
    ([], {"type": "dance"}, "bad_request", "Unknown message type"),
    ([], {"max_length": 5}, "bad_request", "Unknown message type"),
    ([], generate("hi", max_new_tokens=1), "bad_state", "Open an inference session first"),
    ([OPEN], OPEN, "bad_state", "already open"),
    ([], dict(OPEN, model="no/such-model"), "unknown_model", "Unknown model 'no/such-model'"),
    ([], dict(OPEN, model=7), "bad_request", "model must be a string"),
    ([], {"type": "open_inference_session"}, "bad_request", "max_length is required"),
    ([], dict(OPEN, max_length="lots"), "bad_request", "max_length must be an integer"),
    ([], dict(OPEN, max_length=0), "bad_request", "max_length must be at least 1"),
    ([], dict(OPEN, max_length=257), "invalid_request", "maximum session length"),
    ([OPEN], generate("hi"), "bad_request", "max_length or max_new_tokens"),
    ([OPEN], generate("hi", max_new_tokens=0), "bad_request", "at least 1"),
    ([OPEN], generate(5, max_new_tokens=1), "bad_request", "inputs must be a string"),
    ([OPEN], generate(max_new_tokens=1), "invalid_request", "inputs are required"),
    ([OPEN], generate("hi", max_new_tokens=1, do_sample="maybe"), "bad_request", "do_sample"),
    ([OPEN], generate("hi", max_new_tokens=1, temperature=-1), "bad_request", "temperature"),
    ([OPEN], generate("hi", max_new_tokens=1, top_p=2), "bad_request", "top_p"),
    ([OPEN], generate("hi", max_new_tokens=1, stop_sequence=3), "bad_request", "stop_sequence"),
    ([OPEN], generate("hi", max_new_tokens=1, extra_stop_sequences=["x"]), "bad_request", "need a stop_sequence"),
    ([OPEN], generate("hi", max_new_tokens=1, stop_sequence="two tokens", extra_stop_sequences=["x"]),
     "invalid_request", "exactly one token"),
    ([OPEN], generate("hi", max_new_tokens=9), "invalid_request", "limit of 8"),
    ([dict(OPEN, max_length=8)], generate("nine char", max_new_tokens=1), "max_length_exceeded",
     "Maximum length exceeded"),
    ([], json.dumps(generate("x" * 2000, max_new_tokens=1)), "bad_request", "Message too large"),
])
async def test_a_bad_message_gets_an_error_reply_and_the_connection_stays_usable(serve_fakes, before, message,
                                                                                 code, expected):
    server = await serve_fakes(models=[LIMITED], max_message_bytes=1000)
    client = await server.websocket()
    for setup in before:
        assert (await client.request(setup))["ok"]
    reply = await client.request(message)
    assert set(reply) == {"ok", "traceback", "code", "retryable"}
    assert reply["ok"] is False and reply["code"] == code and reply["retryable"] is False
    assert expected in reply["traceback"] and 'File "' not in reply["traceback"]
    assert server.manager.metrics.registry.get_sample_value("swarm_chat_errors_total", {"code": code}) == 1
    follow = await client.request(generate("hi", max_new_tokens=1) if before else OPEN)
    assert follow["ok"] is True
    client.close()


async def test_a_message_far_over_the_limit_closes_the_socket(serve_fakes):
    server = await serve_fakes(max_message_bytes=1000)
    client = await server.websocket()
    await client.send("x" * 5000)  # over four times the limit: not even read
    assert await client.receive() is None
    assert client.connection.close_code == 1009


async def test_max_new_tokens_up_to_the_model_s_limit_is_served(serve_fakes):
    server = await serve_fakes(models=[LIMITED], reply="abcdefghijkl")
    client = await server.websocket()
    await client.request(OPEN)
    reply = await client.request(generate("x", max_new_tokens=8))
    assert reply["ok"] and reply["outputs"] == "abcdefgh"
    client.close()


async def test_a_client_s_connections_past_its_limit_are_refused_until_one_closes(serve_fakes):
    server = await serve_fakes(max_connections_per_client=2)
    held = [await server.websocket(), await server.websocket()]
    refused = await server.websocket()
    reply = await refused.receive()
    assert reply["ok"] is False and reply["code"] == "too_many_connections" and reply["retryable"] is True
    assert await refused.receive() is None and refused.connection.close_code == 1013  # try again later
    held[0].close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:  # the place comes back once the server has seen the close
        again = await server.websocket()
        reply = await again.request(OPEN)
        if reply is not None and reply["ok"]:
            break
        assert loop.time() < deadline, reply
        await asyncio.sleep(0.05)
    for client in (held[1], again):
        client.close()


async def test_a_client_s_sessions_past_its_limit_are_refused_as_retryable(serve_fakes):
    server = await serve_fakes(max_sessions_per_client=1)
    first, second = await server.websocket(), await server.websocket()
    assert (await first.request(OPEN))["ok"]
    reply = await second.request(OPEN)
    assert reply["ok"] is False and reply["code"] == "too_many_sessions" and reply["retryable"] is True
    first.close()
    await wait_for_no_sessions(server.manager)
    assert (await second.request(OPEN))["ok"]  # the same connection may try again
    second.close()


async def test_a_flood_of_generates_is_bounded_per_session(serve_fakes):
    server = await serve_fakes(reply="a" * 5000, step_seconds=0.005)
    client = await server.websocket()
    await client.request(dict(OPEN, max_length=256))
    sent = MAX_WAITING_GENERATIONS + 4
    for _ in range(sent):  # streams that run until stopped: none ends during the flood
        await client.send(generate("x", max_new_tokens=1, stop_sequence="never written"))
    refused = []
    while len(refused) < sent - 1 - MAX_WAITING_GENERATIONS:  # one runs, the rest wait
        reply = await client.receive()
        if not reply["ok"]:
            refused.append(reply)
    assert {reply["code"] for reply in refused} == {"queue_full"} and all(reply["retryable"] for reply in refused)
    client.close()


async def test_a_private_model_is_served_to_the_server_s_own_page_only(serve_fakes):
    server = await serve_fakes(models=[chat_model(), chat_model("fake/private", public_api=False)])
    request = dict(OPEN, model="fake/private")
    other_page = await server.websocket(origin="https://elsewhere.example")
    reply = await other_page.request(request)
    assert reply["ok"] is False and reply["code"] == "model_not_public" and "own chat page" in reply["traceback"]
    other_page.close()
    own_page = await server.websocket(origin=f"http://127.0.0.1:{server.port}")
    assert await own_page.request(request) == {"ok": True}
    own_page.close()


async def test_allowed_origins_refuse_other_pages_at_the_handshake(serve_fakes):
    import tornado.httpclient

    server = await serve_fakes(allowed_origins=("https://chat.example.org",))
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await server.websocket(origin="https://elsewhere.example")
    assert refused.value.code == 403
    allowed = await server.websocket(origin="https://chat.example.org")
    assert await allowed.request(OPEN) == {"ok": True}
    allowed.close()


async def test_with_an_api_key_the_handshake_needs_it(serve_fakes):
    import tornado.httpclient

    server = await serve_fakes(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer guess"}):
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await server.websocket(headers=headers)
        assert refused.value.code == 401
    client = await server.websocket(headers={"Authorization": "Bearer s3cret"})
    assert await client.request(OPEN) == {"ok": True}
    client.close()


# --- Resumable sessions ------------------------------------------------------------------------

REPLY = "the quick brown fox jumps over the lazy dog"


async def open_resumable(server) -> tuple:
    client = await server.websocket()
    opened = await client.request(dict(OPEN, resumable=True))
    assert set(opened) == {"ok", "session_id", "resume_token"} and opened["ok"] is True
    return client, opened


def resume(opened: dict, last_seq: int = 0) -> dict:
    return {"type": "resume_inference_session", "session_id": opened["session_id"],
            "resume_token": opened["resume_token"], "last_seq": last_seq}


async def test_a_plain_session_s_replies_carry_no_seq(serve_fakes):
    server = await serve_fakes(reply=REPLY)
    client = await server.websocket()
    assert await client.request(OPEN) == {"ok": True}
    replies = await client.stream(generate("x", max_new_tokens=4, stop_sequence="fox"))
    assert replies[-1]["stop"] and all("seq" not in reply for reply in replies)
    client.close()


async def test_a_resumed_stream_delivers_every_reply_exactly_once_and_goes_on(serve_fakes):
    server = await serve_fakes(reply=REPLY, step_seconds=0.005)
    first, opened = await open_resumable(server)
    assert len(opened["resume_token"]) >= 32 and opened["session_id"]
    await first.send(generate("x", max_new_tokens=1, stop_sequence="never written"))
    received = [await first.receive() for _ in range(5)]
    first.connection.stream.close()  # the connection drops mid-stream, without a closing handshake
    await asyncio.sleep(0.1)  # tokens keep coming while nobody listens
    assert server.manager.open_session_count == 1

    second = await server.websocket()
    resumed = await second.request(resume(opened, received[-1]["seq"]))
    assert set(resumed) == {"ok", "session_id", "resumed", "latest_seq"}
    assert resumed["ok"] is True and resumed["resumed"] is True and resumed["session_id"] == opened["session_id"]
    assert resumed["latest_seq"] >= 5
    while not received[-1]["stop"]:
        received.append(await second.receive())
    assert [reply["seq"] for reply in received] == list(range(1, len(received) + 1))
    # Every token once, up to the end of sequence that ends the reply.
    assert "".join(reply["outputs"] for reply in received) == REPLY + "\0"

    more = await second.request(generate(" more", max_new_tokens=2))
    assert more["ok"] and more["seq"] == received[-1]["seq"] + 1
    second.connection.close(1000)  # closed on purpose: the session ends at once
    await wait_for_no_sessions(server.manager)


async def test_a_resume_with_the_wrong_token_an_unknown_id_or_unsent_replies_is_refused(serve_fakes):
    server = await serve_fakes(reply=REPLY)
    first, opened = await open_resumable(server)
    first.close()  # dropped (no close code 1000): the session waits for its client
    await asyncio.sleep(0.1)
    assert server.manager.open_session_count == 1
    intruder = await server.websocket()
    for wrong in (dict(resume(opened), resume_token=opened["resume_token"][:-2] + "xx"),
                  dict(resume(opened), session_id="ws-unknown"),
                  resume(opened, last_seq=99)):  # it claims replies that were never sent
        refused = await intruder.request(wrong)
        assert refused["ok"] is False and refused["code"] == "resume_refused" and refused["retryable"] is False
    assert (await intruder.request(resume(opened)))["resumed"] is True  # still there for the right client
    intruder.close()


async def test_a_resumable_session_closed_on_purpose_ends_at_once(serve_fakes):
    server = await serve_fakes(reply=REPLY)
    first, opened = await open_resumable(server)
    first.connection.close(1000)
    await wait_for_no_sessions(server.manager)
    late = await server.websocket()
    assert (await late.request(resume(opened)))["code"] == "resume_refused"
    late.close()


async def test_a_session_not_resumed_within_its_grace_period_is_closed(serve_fakes):
    server = await serve_fakes(reply=REPLY, resume_grace=0.3)
    first, opened = await open_resumable(server)
    first.close()
    await wait_for_no_sessions(server.manager, timeout=5)
    late = await server.websocket()
    assert (await late.request(resume(opened)))["code"] == "resume_refused"
    late.close()


@pytest.mark.parametrize("message, error", [
    ({"type": "resume_inference_session", "session_id": "x"}, "session_id and resume_token are required"),
    ({"type": "resume_inference_session", "session_id": "x", "resume_token": "y", "last_seq": -1},
     "last_seq must be at least 0"),
])
async def test_malformed_resume_messages_are_refused(serve_fakes, message, error):
    server = await serve_fakes()
    client = await server.websocket()
    reply = await client.request(message)
    assert reply["ok"] is False and reply["code"] == "bad_request" and error in reply["traceback"]
    client.close()


async def test_every_reply_echoes_the_id_of_the_request_it_answers(serve_fakes):
    server = await serve_fakes(reply="hello world", step_seconds=0.01)
    client = await server.websocket()
    assert await client.request(dict(OPEN, id="open")) == {"ok": True, "id": "open"}
    await client.send(generate("Hi", max_new_tokens=1, stop_sequence="d", id=1))
    for _ in range(MAX_WAITING_GENERATIONS + 1):  # one more than may wait behind the running one
        await client.send(generate("!", max_new_tokens=1, id="queued"))
    replies = []
    while not any(reply.get("id") == 1 and reply["stop"] for reply in replies if reply["ok"]):
        replies.append(await client.receive())
    refused = [reply for reply in replies if not reply["ok"]]
    assert [(reply["code"], reply["id"]) for reply in refused] == [("queue_full", "queued")]
    streamed = [reply for reply in replies if reply["ok"]]
    assert "".join(reply["outputs"] for reply in streamed) == "hello world"
    assert {reply["id"] for reply in streamed} == {1}
    queued = [await client.receive() for _ in range(MAX_WAITING_GENERATIONS)]
    assert {reply["id"] for reply in queued} == {"queued"}
    assert (await client.request({"type": "stop", "id": 2.5}))["code"] == "bad_request"  # not an id: no echo
    client.close()
    await wait_for_no_sessions(server.manager)
