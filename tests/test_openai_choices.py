"""Several choices (``n`` > 1) through the official openai client on the real swarm: the rows of one
inference session, each an independent sample that is, logit for logit, what a request of one row
with that row's seed writes."""

import json

import jsonschema
import openai
import pytest

from tests.helpers import wait_for_no_sessions

DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tests/tiny-llama"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STORY = [{"role": "user", "content": "Tell me a story."}]
# Drafts change which random numbers a sample draws (not its distribution): the single-row
# requests the rows are compared with run without them, as rows do.
ONE_ROW = {"extra_body": {"speculative": False}}


@pytest.fixture
def client(ws_port):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", max_retries=0)


def logprobs_of(choice) -> list:
    return [(entry.token, entry.logprob) for entry in choice.logprobs.content]


async def test_each_row_is_the_sample_one_row_with_its_seed_writes(client, manager):
    rows = await client.chat.completions.create(model=TINY, messages=STORY, n=3, temperature=1.0, seed=11,
                                                max_tokens=12, logprobs=True)
    assert [choice.index for choice in rows.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in rows.choices]
    assert len(set(texts)) == 3, texts  # independent samples
    singles = [await client.chat.completions.create(model=TINY, messages=STORY, temperature=1.0, seed=11 + index,
                                                    max_tokens=12, logprobs=True, **ONE_ROW)
               for index in range(3)]
    for row, single in zip(rows.choices, singles):
        assert row.message.content == single.choices[0].message.content
        assert row.finish_reason == single.choices[0].finish_reason
        for (token, logprob), (single_token, single_logprob) in zip(logprobs_of(row), logprobs_of(single.choices[0]),
                                                                     strict=True):
            assert token == single_token and logprob == pytest.approx(single_logprob, abs=1e-4)
    assert rows.usage.prompt_tokens == singles[0].usage.prompt_tokens  # counted once
    assert rows.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    await wait_for_no_sessions(manager)


async def test_greedy_rows_are_the_greedy_reply(client, manager):
    single = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=7)
    rows = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=7, n=3)
    assert "Paris" in single.choices[0].message.content
    assert [choice.message.content for choice in rows.choices] == [single.choices[0].message.content] * 3
    await wait_for_no_sessions(manager)


async def test_a_stream_of_rows_tells_each_chunk_s_index(client, manager):
    whole = await client.completions.create(model=TINY, prompt="Once upon a time", n=2, temperature=1.0, seed=5,
                                            max_tokens=8)
    stream = await client.completions.create(model=TINY, prompt="Once upon a time", n=2, temperature=1.0, seed=5,
                                             max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    *pieces, usage = chunks
    for choice in whole.choices:
        mine = [chunk.choices[0] for chunk in pieces if chunk.choices[0].index == choice.index]
        assert "".join(piece.text for piece in mine) == choice.text
        assert [piece.finish_reason for piece in mine][-1] == choice.finish_reason == "length"
    assert usage.usage.completion_tokens == whole.usage.completion_tokens == 16
    await wait_for_no_sessions(manager)


async def test_a_row_stopped_by_a_stop_string_ends_while_the_other_goes_on(client, manager):
    free = await client.completions.create(model=TINY, prompt="Once upon a time", n=2, temperature=1.0, seed=3,
                                           max_tokens=12)
    first, second = (choice.text for choice in free.choices)
    # A piece of the second row's text that the first never writes.
    stop = next(second[start:start + 3] for start in range(2, len(second) - 2) if second[start:start + 3] not in first)
    stopped = await client.completions.create(model=TINY, prompt="Once upon a time", n=2, temperature=1.0, seed=3,
                                              max_tokens=12, stop=[stop])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (first, "length")
    assert (stopped.choices[1].text, stopped.choices[1].finish_reason) == (second[:second.index(stop)], "stop")
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model=TINY, prompt="Hi", n=5)
    assert caught.value.body["param"] == "n"
    await wait_for_no_sessions(manager)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12}}}}}


async def test_each_row_follows_its_own_constraint(client, manager):
    """Tiny Llama's random weights, sampled: only each row's own matcher makes its output valid."""
    schema = {"type": "object", "additionalProperties": False, "required": ["id", "ok"],
              "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 1000}, "ok": {"type": "boolean"}}}
    reply = await client.chat.completions.create(
        model=TINY, messages=STORY, n=3, temperature=1.0, seed=2, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "data", "schema": schema}})
    answers = [json.loads(choice.message.content) for choice in reply.choices]
    for answer in answers:
        jsonschema.validate(answer, schema)
    assert len({json.dumps(answer) for answer in answers}) > 1  # three samples, not one
    calls = await client.chat.completions.create(model=TINY, messages=STORY, n=2, temperature=1.0, seed=2,
                                                 max_tokens=60, tools=[WEATHER_TOOL], tool_choice="required")
    for choice in calls.choices:
        [call] = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert set(json.loads(call.function.arguments)) == {"city"}
    assert calls.choices[0].message.tool_calls[0].id != calls.choices[1].message.tool_calls[0].id
    await wait_for_no_sessions(manager)
