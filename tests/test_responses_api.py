"""``/v1/responses`` on the real swarm, driven by the official openai package: text, the typed
stream, a function-tool round trip continued by ``previous_response_id`` on the warm session that
wrote it (only the new turn fed), and a JSON schema."""

import json

import jsonschema
import openai
import pytest

from tests.helpers import wait_for_no_sessions

DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tests/tiny-llama"
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"type": "string", "maxLength": 40}}}}


@pytest.fixture
def client(ws_port):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", max_retries=0)


async def test_a_response_and_its_stream_answer_the_same(client, manager):
    asked = dict(model=DEFAULT, instructions="Answer in one sentence.", input="What is the capital of France?",
                 temperature=0, max_output_tokens=40)
    response = await client.responses.create(**asked)
    assert response.status == "completed" and "Paris" in response.output_text
    assert "<|im_end|>" not in response.output_text
    assert response.usage.input_tokens > 10 and response.usage.output_tokens > 3

    async with client.responses.stream(**asked) as stream:
        events = [event async for event in stream]
        streamed = await stream.get_final_response()
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == streamed.output_text == response.output_text
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert (await client.responses.retrieve(streamed.id)).output_text == streamed.output_text
    await wait_for_no_sessions(manager)


async def test_a_tool_round_trip_continues_the_warm_session_feeding_only_the_new_turn(client, manager, warm_pool):
    """On Tiny Llama's random weights: only the grammar makes the call well-formed."""
    warm_pool(max_sessions=4)
    question = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    async with client.responses.stream(model=TINY, input=question, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_output_tokens=60) as stream:
        events = [event async for event in stream]
        called = await stream.get_final_response()
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    argument_deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(argument_deltas) > 3 and "".join(argument_deltas) == call.arguments  # streamed as written

    # The result goes back by reference to the response: the session that wrote the call goes on.
    answered = await client.responses.create(
        model=TINY, previous_response_id=called.id, tools=[WEATHER], temperature=0,
        max_output_tokens=8, input=[{"type": "function_call_output", "call_id": call.call_id,
                                     "output": '{"weather": "sunny, 21 C"}'}])
    assert answered.status in ("completed", "incomplete") and len(answered.output) == 1
    # Every token of the earlier turn but the last one chosen (never fed) was still in the swarm.
    conversation = called.usage.input_tokens + called.usage.output_tokens
    assert answered.usage.input_tokens_details.cached_tokens == conversation - 1
    again = await client.responses.create(model=TINY, previous_response_id=answered.id, input="Thanks!",
                                          tools=[WEATHER], temperature=0, max_output_tokens=4)
    assert again.usage.input_tokens_details.cached_tokens == (answered.usage.input_tokens
                                                              + answered.usage.output_tokens - 1)

    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model=TINY, previous_response_id="resp_unknown", input="Hi")
    assert caught.value.body["param"] == "previous_response_id"
    await client.responses.delete(again.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(again.id)


async def test_a_json_schema_format_holds_the_reply(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string",
                                                                                     "maxLength": 20}}}
    response = await client.responses.create(
        model=TINY, input="Name a city.", temperature=0, max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "place", "schema": schema}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
