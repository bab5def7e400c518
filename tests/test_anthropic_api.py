"""Anthropic's Messages API on the real swarm, driven by the official anthropic package."""

import json

import anthropic
import jsonschema
import pytest

from tests.helpers import wait_for_no_sessions

DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tests/tiny-llama"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
WEATHER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city"],
                  "properties": {"city": {"type": "string", "maxLength": 20}}}
WEATHER_TOOL = {"name": "get_weather", "description": "The current weather in a city", "input_schema": WEATHER_SCHEMA}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
# The client no longer offers Anthropic's sampling settings; the API still takes them.
GREEDY = {"temperature": 0}


@pytest.fixture
def client(ws_port):
    return anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{ws_port}", api_key="unused", max_retries=0)


async def test_a_message_its_stream_and_its_token_count_agree(client, manager):
    reply = await client.messages.create(model=DEFAULT, max_tokens=40, extra_body=GREEDY, messages=QUESTION)
    [block] = reply.content
    assert block.type == "text" and "Paris" in block.text and "<|im_end|>" not in block.text
    assert reply.stop_reason == "end_turn" and reply.id.startswith("msg_") and reply.role == "assistant"
    assert reply.usage.input_tokens > 10 and reply.usage.output_tokens > 3

    async with client.messages.stream(model=DEFAULT, max_tokens=40, extra_body=GREEDY, messages=QUESTION) as stream:
        pieces = [text async for text in stream.text_stream]
        streamed = await stream.get_final_message()
    assert len(pieces) > 3  # token by token
    assert "".join(pieces) == streamed.content[0].text == block.text  # greedy: the same text either way
    assert streamed.stop_reason == "end_turn" and streamed.usage.output_tokens == reply.usage.output_tokens

    counted = await client.messages.count_tokens(model=DEFAULT, messages=QUESTION)
    assert counted.input_tokens == reply.usage.input_tokens
    begun = QUESTION + [{"role": "assistant", "content": "The capital of France is"}]
    continued = await client.messages.create(model=DEFAULT, max_tokens=4, extra_body=GREEDY, messages=begun)
    assert "Paris" in continued.content[0].text and not continued.content[0].text.startswith("The capital")
    with pytest.raises(anthropic.NotFoundError) as caught:
        await client.messages.create(model="no/such-model", max_tokens=4, messages=QUESTION)
    assert caught.value.body["error"]["type"] == "not_found_error"
    await wait_for_no_sessions(manager)


async def test_a_tool_call_streams_its_input_and_its_result_gets_a_reply(client):
    """On Tiny Llama's random weights: only the grammar makes the call well-formed."""
    async with client.messages.stream(model=TINY, max_tokens=40, extra_body=GREEDY, messages=WEATHER_QUESTION,
                                      tools=[WEATHER_TOOL], tool_choice={"type": "any"}) as stream:
        events = [event async for event in stream]
        message = await stream.get_final_message()
    [call] = message.content
    assert message.stop_reason == "tool_use" and call.type == "tool_use" and call.id.startswith("toolu_")
    assert call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER_SCHEMA)
    pieces = [event.partial_json for event in events if event.type == "input_json"]
    assert len(pieces) > 2  # the input came as the model wrote it, not at the end

    follow_up = WEATHER_QUESTION + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}]}]
    answer = await client.messages.create(model=TINY, max_tokens=8, extra_body=GREEDY, messages=follow_up,
                                          tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")
    counted = await client.messages.count_tokens(model=TINY, messages=follow_up, tools=[WEATHER_TOOL],
                                                 tool_choice={"type": "none"})
    assert counted.input_tokens == answer.usage.input_tokens
    # Tools it may call are described to the model, and counted.
    callable_tools = await client.messages.count_tokens(model=TINY, messages=follow_up, tools=[WEATHER_TOOL])
    assert callable_tools.input_tokens > counted.input_tokens


async def test_an_output_format_holds_the_reply_to_its_schema(client):
    """On Tiny Llama's random weights: only the constraint makes the reply valid JSON."""
    reply = await client.messages.create(
        model=TINY, max_tokens=60, extra_body=GREEDY, messages=[{"role": "user", "content": "Name a city."}],
        output_config={"effort": "low", "format": {"type": "json_schema", "schema": WEATHER_SCHEMA}})
    [block] = reply.content
    jsonschema.validate(json.loads(block.text), WEATHER_SCHEMA)
