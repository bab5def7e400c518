"""Anthropic's Messages API (``/v1/messages``) on fakes: the real app and session manager over a
fake model with a ChatML chat template, whose streams answer a set text one character per token
(``tests.fakes``). Replies, streamed events and errors are checked on the wire as Anthropic's
clients read them; a tool call's events are checked on the reply builder, fed a call as a model
writes it. The official client, and tools under a real grammar, are proven on the real swarm in
test_anthropic_api.py.
"""

import json

import pytest

from handlers.anthropic_replies import MessageReplies
from model_specs import ChatSettings
from sessions.accounts.store import KeyLimits
from sessions.errors import SwarmCallFailed
from sessions.formats.tool_syntax import SERVER
from sessions.requests import GenerationUpdate
from tests.fakes import FakeTokenStream, chat_model
from tests.helpers import add_keys, wait_for_no_sessions

QUESTION = [{"role": "user", "content": "Capital of France?"}]
CHATML_QUESTION = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "Paris.<|im_end|>\nmore text the model would write"
REQUEST = {"model": "fake/chat", "max_tokens": 32, "messages": QUESTION}


def fed_text(stream) -> str:
    return "".join(chr(token) for token in stream.fed)


def named_events(body: bytes) -> list:
    """A server-sent event stream's events as (name, parsed data); each event's name is its data's type."""
    text = body.decode()
    assert text.endswith("\n\n"), text
    events = []
    for block in text[:-2].split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        name, data = name_line[len("event: "):], json.loads(data_line[len("data: "):])
        assert data["type"] == name
        events.append((name, data))
    return events


async def post(server, path: str, body: dict, headers: dict = None):
    response = await server.fetch(path, method="POST", body=body, headers=headers)
    return response, json.loads(response.body) if response.headers["Content-Type"].startswith(
        "application/json") else None


async def test_a_message_has_anthropic_s_shape_and_the_prompt_is_the_chat_format(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    response, reply = await post(server, "/v1/messages", REQUEST, headers={"anthropic-version": "2023-06-01"})
    assert response.code == 200
    assert reply["id"].startswith("msg_") and len(reply["id"]) > len("msg_")
    assert reply == {"id": reply["id"], "type": "message", "role": "assistant", "model": "fake/chat",
                     "content": [{"type": "text", "text": "Paris."}], "stop_reason": "end_turn",
                     "stop_sequence": None,
                     "usage": {"input_tokens": len(CHATML_QUESTION), "cache_creation_input_tokens": 0,
                               "cache_read_input_tokens": 0, "output_tokens": len("Paris.<|im_end|>")}}
    assert fed_text(server.streams[0]) == CHATML_QUESTION + "Paris.<|im_end|>"[:-1]
    await wait_for_no_sessions(server.manager)


async def test_system_text_blocks_and_tool_turns_make_the_chat_completion_s_prompt(serve_fakes):
    """The same conversation sent as a chat completion and as a message is the same prompt: the
    system prompt (a string or text blocks), a tool_use as the assistant's call, a tool_result as a
    tool message."""
    server = await serve_fakes(reply=ANSWER, models=[chat_model(chat=ChatSettings(max_session_length=1024,
                                                                                   stop_token="<|im_end|>"))])
    weather = {"name": "get_weather", "description": "The weather in a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    message = {**REQUEST, "system": [{"type": "text", "text": "Answer "}, {"type": "text", "text": "briefly."}],
               "tools": [weather], "tool_choice": {"type": "none"}, "messages": [
                   *QUESTION,
                   {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                     {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                      "input": {"city": "Paris"}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                 "content": [{"type": "text", "text": "sunny"}]},
                                                {"type": "text", "text": "And so?"}]}]}
    chat = {"model": "fake/chat", "max_tokens": 32, "tool_choice": "none", "messages": [
        {"role": "system", "content": "Answer briefly."}, *QUESTION,
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And so?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                    "parameters": weather["input_schema"]}}]}
    response, reply = await post(server, "/v1/messages", message)
    assert response.code == 200, reply
    prompts = [fed_text(server.streams[-1])[:reply["usage"]["input_tokens"]]]
    response, reply = await post(server, "/v1/chat/completions", chat)
    assert response.code == 200, reply
    prompts.append(fed_text(server.streams[-1])[:reply["usage"]["prompt_tokens"]])
    assert prompts[0] == prompts[1]
    assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in prompts[0]
    assert "Result of the tool call toolu_1: sunny" in prompts[0] and "<tool_call>" in prompts[0]
    response, error_result = await post(server, "/v1/messages", {**REQUEST, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "no such city",
                                     "is_error": True}]}]})
    assert "Result of the tool call toolu_1: Error: no such city" in fed_text(server.streams[-1])


async def test_a_stream_sends_anthropic_s_events_in_order(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    response = await server.fetch("/v1/messages", method="POST", body={**REQUEST, "stream": True})
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = named_events(response.body)
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    assert deltas >= len("Paris.")  # token by token
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == len(CHATML_QUESTION) and start["usage"]["output_tokens"] == 0
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "Paris."  # the end-of-turn text never leaks
    assert all(data["index"] == 0 and data["delta"]["type"] == "text_delta"
               for name, data in events if name == "content_block_delta")
    end = events[-2][1]
    assert end["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert end["usage"]["output_tokens"] == len("Paris.<|im_end|>")


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequences_and_max_tokens_give_their_stop_reasons(serve_fakes, stream):
    server = await serve_fakes(reply=ANSWER)

    async def ending(**changes) -> tuple:
        response = await server.fetch("/v1/messages", method="POST", body={**REQUEST, **changes, "stream": stream})
        if not stream:
            reply = json.loads(response.body)
            return reply["content"][0]["text"], reply["stop_reason"], reply["stop_sequence"]
        events = named_events(response.body)
        text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
        return text, events[-2][1]["delta"]["stop_reason"], events[-2][1]["delta"]["stop_sequence"]

    assert await ending(stop_sequences=["zzz", "is."]) == ("Par", "stop_sequence", "is.")
    assert await ending(max_tokens=3) == ("Par", "max_tokens", None)
    # The model's own end of turn is no stop sequence of the client's, even when listed as one.
    assert await ending(stop_sequences=["zzz"]) == ("Paris.", "end_turn", None)


LIMITED = chat_model(max_new_tokens_limit=8)


@pytest.mark.parametrize("changes, status, error_type, named", [
    ({"model": "no/such-model"}, 404, "not_found_error", "no/such-model"),
    ({"model": "fake/private"}, 403, "permission_error", "fake/private"),
    ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 9}, 400, "invalid_request_error", "max_tokens"),
    ({"temperature": "hot"}, 400, "invalid_request_error", "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}]}]},
     400, "invalid_request_error", "'image' blocks"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, 400,
     "invalid_request_error", "'document' blocks"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, 400, "invalid_request_error", "thinking"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error",
     "web_search_20250305"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}]}, 400, "invalid_request_error", "text only"),
    ({"messages": [{"role": "assistant", "content": "It is"}]}, 400, "invalid_request_error", "follows a user"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": "It is"}],
      "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, 400, "invalid_request_error", "calls no tools"),
    ({"tool_choice": {"type": "any"}}, 400, "invalid_request_error", "tool_choice"),
    ({"output_config": {"task_budget": 5}}, 400, "invalid_request_error", "output_config.task_budget"),
    ({"messages": [{"role": "system", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]},
     400, "invalid_request_error", "tool_result blocks are not allowed in a system message"),
    ({"stream": True, "model": "no/such-model"}, 404, "not_found_error", "no/such-model"),
])
async def test_errors_have_anthropic_s_shape_and_name_what_is_refused(serve_fakes, changes, status, error_type,
                                                                      named):
    server = await serve_fakes(models=[LIMITED, chat_model("fake/private", public_api=False)])
    body = {key: value for key, value in {**REQUEST, **changes}.items() if value is not None}
    response, reply = await post(server, "/v1/messages", body)
    assert response.code == status
    assert reply is not None  # a JSON error, also for a streamed request refused before its first event
    assert reply == {"type": "error", "error": {"type": error_type, "message": reply["error"]["message"]}}
    assert named in reply["error"]["message"]
    assert server.opened == []


async def test_a_system_message_in_the_conversation_s_course_is_rendered_in_place(serve_fakes):
    """Agent tools send reminders as system messages between the turns; output_config's effort is
    accepted and has no effect."""
    server = await serve_fakes(reply=ANSWER)
    response, reply = await post(server, "/v1/messages", {**REQUEST, "output_config": {"effort": "high"}, "messages": [
        *QUESTION, {"role": "system", "content": "Be brief."}]})
    assert response.code == 200, reply
    assert fed_text(server.streams[-1]).startswith(
        CHATML_QUESTION.removesuffix("<|im_start|>assistant\n") + "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>assistant\n")


async def test_a_body_that_is_not_json_is_refused_in_anthropic_s_shape(serve_fakes):
    server = await serve_fakes()
    response = await server.fetch("/v1/messages", method="POST", body="{broken",
                                  headers={"Content-Type": "application/json"})
    error = json.loads(response.body)
    assert response.code == 400 and error["type"] == "error" and "not valid JSON" in error["error"]["message"]
    assert error["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_the_key_may_come_as_x_api_key_or_a_bearer_token(serve_fakes, path):
    server = await serve_fakes(api_key="s3cret")
    for headers in ({}, {"x-api-key": "guess"}, {"Authorization": "Bearer guess"}):
        response, reply = await post(server, path, REQUEST, headers=headers)
        assert response.code == 401
        assert reply["type"] == "error" and reply["error"]["type"] == "authentication_error"
    for headers in ({"x-api-key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
        response, reply = await post(server, path, REQUEST, headers=headers)
        assert response.code == 200, reply


async def test_a_client_at_its_session_limit_gets_a_429_rate_limit_error_to_retry(serve_fakes):
    server = await serve_fakes(max_sessions_per_client=1)
    held = await server.websocket()
    assert (await held.request({"type": "open_inference_session", "max_length": 16}))["ok"]
    for stream in (False, True):  # a stream refused before its first event is a plain HTTP error
        response, reply = await post(server, "/v1/messages", {**REQUEST, "stream": stream})
        assert response.code == 429 and response.headers["Retry-After"] == "1"
        assert reply["error"]["type"] == "rate_limit_error"


async def test_count_tokens_counts_the_prompt_a_message_would_have_without_a_session(serve_fakes):
    server = await serve_fakes(reply=ANSWER)
    body = {"model": "fake/chat", "system": "Answer briefly.", "messages": QUESTION}
    response, counted = await post(server, "/v1/messages/count_tokens", body)
    assert response.code == 200 and server.opened == []
    _, reply = await post(server, "/v1/messages", {**body, "max_tokens": 8})
    assert counted == {"input_tokens": reply["usage"]["input_tokens"]}
    assert counted["input_tokens"] == len("<|im_start|>system\nAnswer briefly.<|im_end|>\n" + CHATML_QUESTION)
    response, refused = await post(server, "/v1/messages/count_tokens", {**body, "model": "no/such-model"})
    assert response.code == 404 and refused["error"]["type"] == "not_found_error"


class WarmableStream(FakeTokenStream):
    """A fake stream that a warm pool can weigh, and so keep."""

    @property
    def state_bytes(self) -> int:
        return 4 * len(self.fed)


async def test_a_last_assistant_message_begins_the_reply(serve_fakes):
    """Its text ends the prompt, after the turn the chat format opens for the reply, and counts as
    the prompt's; the reply is what follows it."""
    server = await serve_fakes(reply=ANSWER)
    body = {"model": "fake/chat", "messages": [*QUESTION, {"role": "assistant", "content": [
        {"type": "text", "text": "The capital"}, {"type": "text", "text": " is "}]}]}
    _, reply = await post(server, "/v1/messages", {**body, "max_tokens": 32})
    prompt = CHATML_QUESTION + "The capital is "
    assert fed_text(server.streams[0]).startswith(prompt) and reply["usage"]["input_tokens"] == len(prompt)
    assert reply["content"] == [{"type": "text", "text": "Paris."}]  # what the fake model writes next
    _, counted = await post(server, "/v1/messages/count_tokens", body)
    assert counted == {"input_tokens": len(prompt)}


async def test_a_warm_session_s_tokens_are_read_from_the_cache_and_not_counted_as_input(serve_fakes):
    server = await serve_fakes(reply=ANSWER, warm_sessions=4, stream=WarmableStream)
    _, first = await post(server, "/v1/messages", REQUEST)
    assert first["usage"]["cache_read_input_tokens"] == 0
    follow_up = {**REQUEST, "messages": [*QUESTION, {"role": "assistant", "content": "Paris."},
                                         {"role": "user", "content": "And of Spain?"}]}
    _, second = await post(server, "/v1/messages", follow_up)
    _, counted = await post(server, "/v1/messages/count_tokens", follow_up)
    usage = second["usage"]
    assert len(server.opened) == 1  # the first request's session, continued
    assert usage["cache_read_input_tokens"] > len(CHATML_QUESTION)  # the first prompt, and the reply
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == counted["input_tokens"]


async def test_a_key_in_x_api_key_spends_its_limits_and_is_refused_with_a_rate_limit_error(serve_fakes, tmp_path):
    keys = add_keys(tmp_path / "keys.db", alice=KeyLimits(requests_per_minute=1))
    server = await serve_fakes(keys_db=tmp_path / "keys.db", reply=ANSWER)
    response, _ = await post(server, "/v1/messages", REQUEST, headers={"x-api-key": keys["alice"]})
    assert response.code == 200
    response, refused = await post(server, "/v1/messages", REQUEST, headers={"x-api-key": keys["alice"]})
    assert response.code == 429 and int(response.headers["Retry-After"]) >= 1
    assert refused == {"type": "error", "error": {"type": "rate_limit_error", "message": refused["error"]["message"]}}


class FailingStream(FakeTokenStream):
    """Fails as a swarm server that went away would, at its fourth step."""

    def step(self, *args, **options):
        if len(self.fed) >= len(CHATML_QUESTION) + 2:
            raise SwarmCallFailed("step") from ConnectionResetError("Connection reset by peer")
        return super().step(*args, **options)


async def test_a_stream_that_fails_after_it_started_ends_with_an_error_event(serve_fakes):
    server = await serve_fakes(reply=ANSWER, stream=FailingStream)
    response = await server.fetch("/v1/messages", method="POST", body={**REQUEST, "stream": True})
    events = named_events(response.body)
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "overloaded_error"  # a swarm failure: 503, retryable
    assert "message_stop" not in [name for name, _ in events]


def update(text: str, last: bool = False) -> GenerationUpdate:
    return GenerationUpdate(outputs=text, text=text, last=last, token_count=1, finish_reason="stop" if last else None)


def test_a_tool_call_streams_its_input_as_the_model_writes_it():
    arguments = {"city": "Paris", "days": [1, 2]}
    written = SERVER.write("get_weather", arguments)
    replies = MessageReplies("fake/chat", SERVER, ())
    events = [event for index, char in enumerate(written)
              for event in replies.events(update(char, last=index == len(written) - 1), 40, 0)]
    types = [event.type for event in events]
    assert types[:2] == ["message_start", "content_block_start"] and types[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    start = events[1].model_dump()
    assert start["content_block"] == {"type": "tool_use", "id": start["content_block"]["id"], "name": "get_weather",
                                      "input": {}} and start["content_block"]["id"].startswith("toolu_")
    pieces = [event.delta.partial_json for event in events if event.type == "content_block_delta"]
    assert all(event.delta.type == "input_json_delta" for event in events if event.type == "content_block_delta")
    assert "".join(pieces) == json.dumps(arguments)
    assert len(pieces) > 10  # piece by piece, not at the end
    # The name is told as soon as it is written, before the arguments.
    assert types.index("content_block_start") < written.index('"arguments"') + 1
    assert events[-2].delta.stop_reason == "tool_use"
    message = replies.message().model_dump()
    assert message["stop_reason"] == "tool_use" and message["content"] == [
        {"type": "tool_use", "id": start["content_block"]["id"], "name": "get_weather", "input": arguments}]
    assert message["usage"]["output_tokens"] == len(written) and message["usage"]["input_tokens"] == 40


def test_free_text_with_tools_is_a_text_block_and_a_call_cut_short_is_its_text():
    replies = MessageReplies("fake/chat", SERVER, ())
    for piece, last in (("It is ", False), ("sunny.", True)):
        replies.events(update(piece, last), 10, 0)
    assert replies.message().model_dump()["content"] == [{"type": "text", "text": "It is sunny."}]
    replies = MessageReplies("fake/chat", SERVER, ())
    cut = SERVER.write("get_weather", {"city": "Paris"})[:30]
    events = replies.events(update(cut[:20]), 10, 0) + replies.events(
        GenerationUpdate(outputs=cut[20:], text=cut[20:], last=True, token_count=1, finish_reason="length"), 10, 0)
    assert events[-2].delta.stop_reason == "max_tokens"
    assert replies.message().model_dump()["content"] == [{"type": "text", "text": cut}]
