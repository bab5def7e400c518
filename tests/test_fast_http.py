"""``POST /api/v1/generate`` and ``GET /api/v1/models`` on fakes: the real app and session manager
over fake models whose streams answer a set text one character per token (``tests.fakes``), for
the replies' shape, the parameters' sources and every error status a client can meet. That the
text is the model's own is proven on the real swarm in test_http_api.py.
"""

import asyncio
import json
import urllib.parse

import pytest

from tests.fakes import chat_model
from tests.helpers import wait_for_no_sessions

FORM = "application/x-www-form-urlencoded"


async def post_generate(server, body, content_type: str = "application/json", query: str = "",
                        headers: dict = None):
    """The status, the JSON reply and the headers of a POST to /api/v1/generate."""
    if isinstance(body, dict):
        body = json.dumps(body) if content_type == "application/json" else urllib.parse.urlencode(body)
    response = await server.fetch("/api/v1/generate" + query, method="POST", body=body,
                                  headers={"Content-Type": content_type, **(headers or {})})
    assert response.headers["Content-Type"].startswith("application/json")
    return response.code, json.loads(response.body), response.headers


def fed_text(stream) -> str:
    return "".join(chr(token) for token in stream.fed)


async def test_a_form_body_answers_the_new_text_and_keeps_the_prompt_s_whitespace(serve_fakes):
    server = await serve_fakes(reply="hello world")
    code, reply, _ = await post_generate(server, {"inputs": "  Hi\n", "max_new_tokens": "5"}, FORM)
    assert (code, reply) == (200, {"ok": True, "outputs": "hello"})
    assert fed_text(server.streams[0]).startswith("  Hi\nhell")  # the prompt as sent, then the reply
    await wait_for_no_sessions(server.manager)  # each request's session is closed after it


async def test_a_json_body_and_a_query_string_take_the_same_parameters(serve_fakes):
    server = await serve_fakes(reply="hello world", models=[chat_model(aliases=("fc",))])
    code, reply, _ = await post_generate(server, {"model": "fake/chat", "inputs": "Hi", "max_length": 6})
    assert (code, reply) == (200, {"ok": True, "outputs": "hell"})  # the session holds at most 6 tokens
    code, reply, _ = await post_generate(server, b"", FORM, query="?model=fc&inputs=Hi&max_new_tokens=2&do_sample=true")
    assert (code, reply) == (200, {"ok": True, "outputs": "he"})
    assert server.opened == [("fake/chat", 6), ("fake/chat", 4)]  # each sized for its request


async def test_a_generation_that_reaches_the_end_of_sequence_ends_there(serve_fakes):
    server = await serve_fakes(reply="ok")
    code, reply, _ = await post_generate(server, {"inputs": "Hi", "max_new_tokens": 10})
    assert code == 200 and reply["outputs"] in ("ok", "ok\0")  # the end of sequence's own text at most


LIMITED = chat_model(max_new_tokens_limit=8)
PRIVATE = chat_model("fake/private", public_api=False)
BROKEN = chat_model("fake/broken")


@pytest.mark.parametrize("body, content_type, status, code, expected", [
    ({"inputs": "Hi"}, FORM, 400, "bad_request", "max_length or max_new_tokens"),
    ({"inputs": "Hi", "max_new_tokens": "many"}, FORM, 400, "bad_request", "must be an integer"),
    ({"inputs": "Hi", "max_new_tokens": "9" * 5000}, FORM, 400, "bad_request", "must be an integer"),
    ({"inputs": "Hi", "max_new_tokens": "2", "do_sample": "perhaps"}, FORM, 400, "bad_request", "do_sample"),
    ({"inputs": "Hi", "max_new_tokens": "2", "temperature": "inf"}, FORM, 400, "bad_request",
     "temperature must be a finite number"),
    ({"max_new_tokens": "2"}, FORM, 400, "invalid_request", "inputs"),
    ({"inputs": "Hi", "max_new_tokens": 9}, "application/json", 400, "invalid_request", "limit of 8"),
    ({"inputs": "Hi", "max_new_tokens": 2, "max_length": 300}, "application/json", 400, "invalid_request",
     "maximum session length"),
    ("{broken", "application/json", 400, "bad_request", "not valid JSON"),
    ("[1]", "application/json", 400, "bad_request", "must be a JSON object"),
    ({"model": "nope/nope", "inputs": "Hi", "max_new_tokens": 2}, FORM, 404, "unknown_model", "Unknown model"),
    ({"model": "fake/private", "inputs": "Hi", "max_new_tokens": 2}, FORM, 403, "model_not_public",
     "only served to this server's own chat page"),
    ({"model": "fake/broken", "inputs": "Hi", "max_new_tokens": 2}, FORM, 400, "model_unavailable",
     "declared but not available: it cannot be served"),
])
async def test_a_bad_request_is_answered_with_its_status_and_a_json_error(serve_fakes, body, content_type, status,
                                                                          code, expected):
    server = await serve_fakes(models=[LIMITED, PRIVATE, BROKEN], refusals={"fake/broken": "it cannot be served"})
    answered, reply, _ = await post_generate(server, body, content_type)
    assert answered == status
    assert set(reply) == {"ok", "traceback", "code", "retryable"}
    assert reply["ok"] is False and reply["code"] == code and reply["retryable"] is False
    assert expected in reply["traceback"] and 'File "' not in reply["traceback"]
    assert server.opened == []  # refused before any session was opened


async def test_a_body_announced_over_the_limit_is_refused_before_it_is_read(serve_fakes):
    server = await serve_fakes(max_body_bytes=1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 2000\r\n\r\n")  # and never the body
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 413 "), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    reply = json.loads(await reader.readexactly(length))
    writer.close()
    assert reply["ok"] is False and reply["code"] == "payload_too_large" and "at most 1000" in reply["traceback"]
    code, reply, _ = await post_generate(server, {"inputs": "Hi", "max_new_tokens": 2})  # within it: served
    assert code == 200 and reply["ok"]


async def test_a_client_at_its_session_limit_gets_a_429_to_retry(serve_fakes):
    server = await serve_fakes(max_sessions_per_client=1)
    held = await server.websocket()
    assert (await held.request({"type": "open_inference_session", "max_length": 16}))["ok"]
    code, reply, headers = await post_generate(server, {"inputs": "Hi", "max_new_tokens": 2})
    assert code == 429 and reply["code"] == "too_many_sessions" and reply["retryable"] is True
    assert headers["Retry-After"] == "1"
    held.close()
    await wait_for_no_sessions(server.manager)
    code, reply, _ = await post_generate(server, {"inputs": "Hi", "max_new_tokens": 2})
    assert code == 200 and reply["ok"]


async def test_a_server_at_its_session_limit_gets_a_503_to_retry(serve_fakes):
    server = await serve_fakes(max_sessions=1, queue_timeout=0)  # no waiting for room
    held = await server.websocket()
    assert (await held.request({"type": "open_inference_session", "max_length": 16}))["ok"]
    code, reply, headers = await post_generate(server, {"inputs": "Hi", "max_new_tokens": 2})
    assert code == 503 and reply["code"] == "server_busy" and reply["retryable"] is True
    assert headers["Retry-After"] == "1"
    held.close()


async def test_with_an_api_key_a_request_needs_it(serve_fakes):
    server = await serve_fakes(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer guess"}):
        code, reply, response_headers = await post_generate(server, {"inputs": "Hi", "max_new_tokens": 2},
                                                            headers=headers)
        assert code == 401 and reply["code"] == "unauthorized"
        assert response_headers["WWW-Authenticate"] == "Bearer"
    code, reply, _ = await post_generate(server, {"inputs": "Hi", "max_new_tokens": 2},
                                         headers={"Authorization": "Bearer s3cret"})
    assert code == 200 and reply["ok"]
    assert server.opened == [("fake/chat", 4)]  # the refused requests opened nothing


async def test_the_models_list_shows_every_declared_model_and_why_one_is_unavailable(serve_fakes):
    served = chat_model(aliases=("fc",))
    server = await serve_fakes(models=[served, PRIVATE, BROKEN], refusals={"fake/broken": "it cannot be served"})
    response = await server.fetch("/api/v1/models")
    listed = json.loads(response.body)
    assert response.code == 200 and listed["ok"] is True
    assert [(model["model"], model["available"], model["public_api"]) for model in listed["models"]] == [
        ("fake/chat", True, True), ("fake/private", True, False), ("fake/broken", False, True)]
    chat, _, broken = listed["models"]
    assert chat["aliases"] == ["fc"] and chat["num_blocks"] == served.num_blocks
    assert chat["chat"]["max_session_length"] == 256 and chat["chat"]["stop_token"] == "<|im_end|>"
    assert chat["chat"]["format"] == served.chat_format.describe()
    assert chat["chat"]["format"]["roles"]["user"] == {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"}
    assert broken["error"] == "it cannot be served" and "chat" not in broken and "num_blocks" not in broken


async def test_an_unknown_path_is_a_json_404(serve_fakes):
    server = await serve_fakes()
    response = await server.fetch("/api/v1/nothing-here")
    reply = json.loads(response.body)
    assert response.code == 404 and reply["ok"] is False and "No such endpoint" in reply["traceback"]


async def test_a_json_body_sent_as_a_form_is_refused_with_the_reason(serve_fakes):
    server = await serve_fakes()
    code, reply, _ = await post_generate(server, b'{"inputs": "Hi", "max_new_tokens": 2}', FORM)
    assert code == 400 and "Either max_length or max_new_tokens is required" in reply["traceback"]
    assert "read as form fields" in reply["traceback"] and "Content-Type: application/json" in reply["traceback"]
    code, reply, _ = await post_generate(server, {"inputs": "Hi"}, FORM)  # a real form: no hint
    assert code == 400 and "form fields" not in reply["traceback"]
