"""Bad input, generated: random and malformed WebSocket messages and HTTP bodies.

Whatever arrives, the server answers ``ok: false`` with a reason (or a well-formed success),
or closes the socket cleanly; it never crashes or answers 500, and once the clients are gone
the open-session gauge is back to zero.
"""

import asyncio
import json
import urllib.parse

import tornado.httpclient
import tornado.websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.load_clients import scrape_open_sessions, wait_for_no_open_sessions
from tests.ws_client import WSClient

TINY = "tests/tiny-llama"
REPLY_TIMEOUT = 30
RELEASE_TIMEOUT = 30
FUZZ_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values of every JSON type, small numbers most of all (valid requests stay short), and edges.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([0, -1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "1", "true", "no", "-5", "1e3", "NaN", TINY, "tl", "nope/model", "\x00", "<|im_end|>"]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)
# The WebSocket and /api/v1 fields, then the OpenAI API's.
FIELDS = ["type", "model", "max_length", "inputs", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
          "repetition_penalty", "stop_sequence", "extra_stop_sequences", "prompt", "messages", "max_tokens",
          "stream", "stop", "n"]
field_values = st.one_of(scalars, json_values)
protocol_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["open_inference_session", "generate", "stop", "", "GENERATE", None, 3])},
    optional={name: field_values for name in FIELDS[1:]},
)


def mutated(messages):
    """Valid messages with one field dropped or replaced by any value."""
    def mutate(message, field, value, drop):
        changed = dict(message)
        if drop:
            changed.pop(field, None)
        else:
            changed[field] = value
        return changed
    return st.builds(mutate, messages, st.sampled_from(FIELDS), field_values, st.booleans())


short_texts = st.text(min_size=1, max_size=30)
valid_opens = st.fixed_dictionaries({"type": st.just("open_inference_session"), "model": st.sampled_from([TINY, "tl"]),
                                     "max_length": st.integers(1, 64)})
valid_generates = st.fixed_dictionaries(
    {"type": st.just("generate"), "inputs": short_texts, "max_new_tokens": st.integers(1, 4)},
    optional={"stop_sequence": short_texts, "do_sample": st.booleans(), "temperature": st.floats(0.1, 2.0),
              "top_p": st.floats(0.1, 1.0), "top_k": st.integers(1, 50), "max_length": st.integers(1, 64)},
)
nearly_valid = st.one_of(valid_opens, valid_generates, mutated(valid_opens), mutated(valid_generates),
                         st.just({"type": "stop"}))
raw_frames = st.one_of(
    nearly_valid.map(json.dumps),
    nearly_valid.map(json.dumps),
    protocol_messages.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=60),
    st.binary(max_size=60),
)


def is_last_reply(reply: dict) -> bool:
    """Whether ``reply`` ends the answer to one message."""
    return not reply["ok"] or "stop" not in reply or reply["stop"]


async def exchange(port: int, frames) -> None:
    """Sends each frame on a fresh connection and checks every reply until the answer ends."""
    client = await WSClient.connect(port)
    try:
        for frame in frames:
            try:
                await client.connection.write_message(frame, binary=isinstance(frame, bytes))
            except tornado.websocket.WebSocketClosedError:
                break
            while True:
                raw = await asyncio.wait_for(client.connection.read_message(), REPLY_TIMEOUT)
                if raw is None:  # a clean close is an allowed answer
                    assert client.connection.close_code in (1000, 1003, 1009), client.connection.close_code
                    return
                reply = json.loads(raw)
                assert isinstance(reply["ok"], bool)
                if not reply["ok"]:
                    assert reply["traceback"] and reply["code"] and isinstance(reply["retryable"], bool)
                if is_last_reply(reply):
                    break
    finally:
        client.close()


async def open_sessions_once_released(port: int) -> int:
    """The open-session gauge of ``/metrics`` once it reads zero, or after ``RELEASE_TIMEOUT``."""
    return await wait_for_no_open_sessions(lambda: scrape_open_sessions(f"http://127.0.0.1:{port}"),
                                           RELEASE_TIMEOUT)


def test_random_websocket_messages(io_loop, ws_port, manager):
    @FUZZ_SETTINGS
    @given(st.lists(raw_frames, min_size=1, max_size=5), st.booleans())
    def check(frames, open_first):
        if open_first:  # most generates need an open session to get past the first check
            frames = [json.dumps({"type": "open_inference_session", "model": TINY, "max_length": 64}), *frames]
        io_loop.run_sync(lambda: exchange(ws_port, frames), timeout=120)

    check()
    # The server still works after all that, and no session is left open.
    io_loop.run_sync(lambda: exchange(ws_port, [json.dumps({"type": "open_inference_session", "model": TINY,
                                                             "max_length": 16})]))
    assert io_loop.run_sync(lambda: open_sessions_once_released(ws_port)) == 0


valid_http_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from([TINY, "tl"]), "inputs": short_texts, "prompt": short_texts,
     "max_new_tokens": st.integers(1, 4), "max_tokens": st.integers(1, 4)},
    optional={"stream": st.booleans(), "stop": short_texts, "temperature": st.floats(0.0, 2.0),
              "messages": st.just([{"role": "user", "content": "Hi"}])},
)
http_bodies = st.one_of(
    st.one_of(valid_http_bodies, mutated(valid_http_bodies)).map(
        lambda body: ("application/json", json.dumps(body).encode())),
    protocol_messages.map(lambda message: ("application/json", json.dumps(message).encode())),
    json_values.map(lambda value: ("application/json", json.dumps(value).encode())),
    st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=12), max_size=5).map(
        lambda form: ("application/x-www-form-urlencoded", urllib.parse.urlencode(form).encode())),
    st.tuples(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
              st.binary(max_size=80)),
)
HTTP_PATHS = ["/api/v1/generate", "/v1/completions", "/v1/chat/completions"]


async def post_and_check(port: int, path: str, content_type: str, body: bytes) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}{path}", method="POST", body=body, headers=headers, raise_error=False,
        request_timeout=REPLY_TIMEOUT)
    assert response.code in (200, 400, 401, 404, 409, 413, 429, 503), (response.code, response.body[:300])
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        assert response.body.rstrip().endswith(b"data: [DONE]")
        return
    reply = json.loads(response.body)
    if path.startswith("/v1/"):
        assert ("error" in reply) is (response.code != 200)
    else:
        assert reply["ok"] is (response.code == 200)
        if not reply["ok"]:
            assert reply["traceback"] and reply["code"]


def test_random_http_bodies(io_loop, ws_port, manager):
    @FUZZ_SETTINGS
    @given(st.sampled_from(HTTP_PATHS), http_bodies)
    def check(path, content_type_and_body):
        io_loop.run_sync(lambda: post_and_check(ws_port, path, *content_type_and_body), timeout=120)

    check()
    assert io_loop.run_sync(lambda: open_sessions_once_released(ws_port)) == 0
