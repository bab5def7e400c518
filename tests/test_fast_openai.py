"""The OpenAI-compatible API's shape on fakes: the real app and session manager over a fake model
with a ChatML chat template, whose streams answer a set text one character per token
(``tests.fakes``). Replies, streamed chunks and errors are checked on the wire as clients read
them. Generation itself, the official clients, logprobs, JSON schemas and tools (which need a real
tokenizer) are proven on the real swarm in test_openai_api.py and test_family_tools.py.
"""

import json

import pytest

from tests.fakes import chat_model
from tests.helpers import wait_for_no_sessions

QUESTION = [{"role": "user", "content": "Capital of France?"}]
CHATML_QUESTION = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "Paris.<|im_end|>\nmore text the model would write"


def fed_text(stream) -> str:
    return "".join(chr(token) for token in stream.fed)


def events(body: bytes) -> list:
    """A server-sent event stream's events: each ``data:`` payload, parsed unless it is ``[DONE]``."""
    text = body.decode()
    assert text.endswith("\n\n"), text
    payloads = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        payloads.append(payload if payload == "[DONE]" else json.loads(payload))
    return payloads


async def post(server, path: str, body: dict, headers: dict = None):
    response = await server.fetch(path, method="POST", body=body, headers=headers)
    return response, (json.loads(response.body) if response.headers["Content-Type"].startswith(
        "application/json") else None)


async def test_the_models_list_has_the_public_models_only(serve_fakes):
    server = await serve_fakes(models=[chat_model("fake/a"), chat_model("fake/private", public_api=False),
                                       chat_model("fake/b")])
    response = await server.fetch("/v1/models")
    assert response.code == 200
    capabilities = ["completion", "chat", "tools", "structured_output", "logprobs"]
    assert json.loads(response.body) == {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "Fake", "root": name, "max_model_len": 256,
         "max_output_tokens": 2048, "capabilities": capabilities} for name in ("fake/a", "fake/b")]}


async def test_a_chat_completion_renders_the_chat_format_and_cuts_its_stop_token(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    response, reply = await post(server, "/v1/chat/completions", {"model": "fake/chat", "messages": QUESTION})
    assert response.code == 200
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert reply["model"] == "fake/chat" and reply["system_fingerprint"] and isinstance(reply["created"], int)
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                                 "logprobs": None, "finish_reason": "stop"}]
    # The conversation in the model's template, then the reply up to the stop token (its tokens counted).
    assert fed_text(server.streams[0]) == CHATML_QUESTION + "Paris.<|im_end|>"[:-1]
    assert reply["usage"]["prompt_tokens"] == len(CHATML_QUESTION)
    assert reply["usage"]["completion_tokens"] == len("Paris.<|im_end|>")
    assert reply["usage"]["total_tokens"] == len(CHATML_QUESTION) + len("Paris.<|im_end|>")
    await wait_for_no_sessions(server.manager)


async def test_system_and_developer_messages_and_text_parts_make_the_same_prompt(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    system = "Answer briefly."
    for messages in ([{"role": "system", "content": system}, *QUESTION],
                     [{"role": "developer", "content": system}, *QUESTION],
                     [{"role": "system", "content": system},
                      {"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                                   {"type": "text", "text": "France?"}]}]):
        response, reply = await post(server, "/v1/chat/completions", {"model": "fake/chat", "messages": messages})
        assert response.code == 200
        prompt = fed_text(server.streams[-1])[:reply["usage"]["prompt_tokens"]]
        assert prompt == "<|im_start|>system\nAnswer briefly.<|im_end|>\n" + CHATML_QUESTION


async def test_max_tokens_cuts_the_reply_with_finish_reason_length(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    for field in ("max_tokens", "max_completion_tokens"):
        response, reply = await post(server, "/v1/chat/completions",
                                     {"model": "fake/chat", "messages": QUESTION, field: 3})
        assert reply["choices"][0]["message"]["content"] == "Par"
        assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 3


async def test_without_max_tokens_the_reply_stops_at_the_model_s_default(serve_fakes):
    server = await serve_fakes(reply="a" * 100, models=[chat_model(default_max_tokens=5)])
    response, reply = await post(server, "/v1/completions", {"model": "fake/chat", "prompt": "Hi"})
    assert reply["choices"][0]["text"] == "aaaaa" and reply["choices"][0]["finish_reason"] == "length"


async def test_a_stop_string_is_cut_from_the_reply(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    response, reply = await post(server, "/v1/chat/completions",
                                 {"model": "fake/chat", "messages": QUESTION, "stop": ["is.", "zzz"]})
    assert reply["choices"][0]["message"]["content"] == "Par"
    assert reply["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_the_most_stop_strings_any_api_allows_are_allowed_besides_the_format_s_own(serve_fakes, path):
    """The chat format's end of turn and the end of sequence end the reply too, but are not the
    client's: they do not count against its 16 stop strings."""
    server = await serve_fakes(reply=ANSWER)
    body = {"model": "fake/chat", "messages": QUESTION, "prompt": "Capital?"}
    response, reply = await post(server, path, dict(body, stop=[f"zz{index}" for index in range(15)] + ["is."]))
    assert response.code == 200, reply
    text = reply["choices"][0].get("text", reply["choices"][0].get("message", {}).get("content"))
    assert text == "Par"
    response, reply = await post(server, path, dict(body, stop=[f"zz{index}" for index in range(17)]))
    assert response.code == 400 and reply["error"]["param"] == "stop"


async def test_a_completion_takes_the_prompt_as_it_is(serve_fakes):
    server = await serve_fakes(reply=" upon a time")
    response, reply = await post(server, "/v1/completions", {"model": "fake/chat", "prompt": "Once", "max_tokens": 20})
    assert response.code == 200
    assert reply["id"].startswith("cmpl-") and reply["object"] == "text_completion" and reply["model"] == "fake/chat"
    # The fake's end of sequence is the tokenizer's: it ends the reply and is not shown.
    assert reply["choices"] == [{"index": 0, "text": " upon a time", "logprobs": None, "finish_reason": "stop"}]
    assert fed_text(server.streams[0]) == "Once upon a time"
    assert reply["usage"]["prompt_tokens"] == len("Once")


async def test_a_streamed_chat_completion_sends_chunks_then_done(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    response = await server.fetch("/v1/chat/completions", method="POST", body={
        "model": "fake/chat", "messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}})
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    *chunks, usage, done = events(response.body)
    assert done == "[DONE]"
    assert len(chunks) >= len("Paris.")  # token by token
    assert len({chunk["id"] for chunk in chunks + [usage]}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == "fake/chat" for chunk in chunks)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0]["role"] == "assistant" and all("role" not in delta for delta in deltas[1:])
    assert "".join(delta["content"] for delta in deltas) == "Paris."  # the stop token never leaks
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len("Paris.<|im_end|>")
    assert usage["usage"]["prompt_tokens"] == len(CHATML_QUESTION)


async def test_a_streamed_completion_ends_with_length_and_no_usage_unless_asked(serve_fakes):
    server = await serve_fakes(reply="abcdefgh")
    response = await server.fetch("/v1/completions", method="POST", body={
        "model": "fake/chat", "prompt": "x", "max_tokens": 4, "stream": True})
    *chunks, done = events(response.body)
    assert done == "[DONE]" and all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "abcd"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]


LIMITED = chat_model(max_new_tokens_limit=8)


@pytest.mark.parametrize("path, changes, status, param, code", [
    ("/v1/chat/completions", {"model": "no/such-model"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "fake/private"}, 403, "model", "model_not_public"),
    ("/v1/chat/completions", {"n": 5}, 400, "n", "invalid_request"),
    ("/v1/chat/completions", {"n": 0}, 400, "n", None),
    ("/v1/chat/completions", {"max_tokens": 9}, 400, "max_tokens", "invalid_request"),
    ("/v1/chat/completions", {"max_completion_tokens": 9}, 400, "max_completion_tokens", "invalid_request"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {"type": "object"}}]}, 400, "functions",
     None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                          "image_url": {"url": "x"}}]}]}, 400,
     "messages", None),
    ("/v1/chat/completions", {"temperature": "hot"}, 400, "temperature", None),
    ("/v1/chat/completions", {"stream": True, "model": "no/such-model"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "Hi", "echo": True}, 400, "echo", None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 9, "stream": True}, 400, "max_tokens", "invalid_request"),
])
async def test_errors_have_openai_s_shape_and_name_the_field(serve_fakes, path, changes, status, param, code):
    server = await serve_fakes(models=[LIMITED, chat_model("fake/private", public_api=False)])
    body = {"model": "fake/chat", **({"messages": QUESTION} if path.endswith("chat/completions") else {}), **changes}
    response, reply = await post(server, path, body)
    assert response.code == status
    assert reply is not None  # a JSON error, also for a streamed request refused before its first event
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param and reply["error"]["message"]
    if code is not None:
        assert reply["error"]["code"] == code
    assert server.opened == []


async def test_a_body_that_is_not_json_is_refused_in_openai_s_shape(serve_fakes):
    server = await serve_fakes()
    response = await server.fetch("/v1/chat/completions", method="POST", body="{broken",
                                  headers={"Content-Type": "application/json"})
    error = json.loads(response.body)["error"]
    assert response.code == 400 and "not valid JSON" in error["message"] and error["type"] == "invalid_request_error"


async def test_a_client_at_its_session_limit_gets_a_429_to_retry(serve_fakes):
    server = await serve_fakes(max_sessions_per_client=1)
    held = await server.websocket()
    assert (await held.request({"type": "open_inference_session", "max_length": 16}))["ok"]
    for stream in (False, True):  # a stream refused before its first event is a plain HTTP error
        response, reply = await post(server, "/v1/completions",
                                     {"model": "fake/chat", "prompt": "Hi", "max_tokens": 2, "stream": stream})
        assert response.code == 429 and response.headers["Retry-After"] == "1"
        assert reply["error"]["code"] == "too_many_sessions"
    held.close()


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions")])
async def test_with_an_api_key_every_endpoint_answers_401_without_it(serve_fakes, method, path):
    server = await serve_fakes(api_key="s3cret")
    body = {"model": "fake/chat", "prompt": "Hi", "messages": QUESTION, "max_tokens": 2} if method == "POST" else None
    for headers in ({}, {"Authorization": "Bearer guess"}):
        response = await server.fetch(path, method=method, body=body, headers=headers)
        assert response.code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(response.body)["error"]["code"] == "invalid_api_key"
    response = await server.fetch(path, method=method, body=body, headers={"Authorization": "Bearer s3cret"})
    assert response.code == 200


async def test_a_cors_preflight_needs_no_key_and_replies_are_readable_by_the_page(serve_fakes):
    server = await serve_fakes(api_key="s3cret")
    origin = {"Origin": "https://app.example.org"}
    preflight = await server.fetch("/v1/chat/completions", method="OPTIONS", headers=dict(origin, **{
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,x-custom"}))
    assert preflight.code == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert [name.strip() for name in preflight.headers["Access-Control-Allow-Headers"].split(",")] == [
        "Authorization", "Content-Type", "x-custom"]
    refused = await server.fetch("/v1/models", headers=origin)
    assert refused.code == 401 and refused.headers["Access-Control-Allow-Origin"] == "*"
