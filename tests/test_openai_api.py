"""The OpenAI-compatible API, driven by the official openai package."""

import asyncio
import json
import logging

import jsonschema
import openai
import pytest

from sessions.engine.stops import StopStringFilter
from tests.helpers import send_raw_post, wait_for_no_sessions

DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tests/tiny-llama"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture
def client(ws_port):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", max_retries=0)


async def test_list_models(client, model_specs):
    models = await client.models.list()
    public = [spec for spec in model_specs if spec.public_api]
    assert [model.id for model in models.data] == [spec.key for spec in public]
    # vLLM's context length, as clients read it from the model's extra fields
    assert [model.model_extra["max_model_len"] for model in models.data] == [
        spec.chat.max_session_length for spec in public]


async def test_chat_completion(client, manager):
    reply = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=40)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert "<|im_end|>" not in choice.message.content
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert reply.system_fingerprint
    assert reply.usage.completion_tokens > 3 and reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    await wait_for_no_sessions(manager)  # released after the reply, in the background


async def test_streamed_chat_completion_matches_the_plain_one(client):
    plain = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=40)
    stream = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=40,
                                                  stream=True)
    pieces, reasons = [], []
    async for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert len(pieces) > 3  # token by token
    assert "".join(pieces) == plain.choices[0].message.content
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}


async def test_text_completion_length_limit(client):
    reply = await client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


async def test_text_completion_leaves_the_end_of_sequence_token_out(client, manager):
    loaded = manager.registry.find(DEFAULT)
    prompt = loaded.chat_format.render(QUESTION)
    reply = await client.completions.create(model=DEFAULT, prompt=prompt, max_tokens=40, temperature=0)
    assert reply.choices[0].finish_reason == "stop" and "Paris" in reply.choices[0].text
    assert loaded.tokenizer.eos_token not in reply.choices[0].text


async def test_stop_string_spanning_tokens_is_cut_and_never_streamed(client):
    plain = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=40)
    answer = plain.choices[0].message.content
    stop = "of Fr"  # inside the answer, spanning at least two tokens (" of", " France")
    assert stop in answer
    stopped = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=40,
                                                   stop=[stop, "zzz"])
    assert stopped.choices[0].message.content == answer[: answer.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=40,
                                                  stop=stop, stream=True)
    streamed = [chunk.choices[0].delta.content or "" async for chunk in stream]
    assert "".join(streamed) == answer[: answer.index(stop)]
    assert not any("Fr" in piece for piece in streamed)


async def test_unknown_model_and_bad_n(client):
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="no/such-model", messages=QUESTION)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model=TINY, prompt="Hi", n=5)
    assert caught.value.body["param"] == "n"


@pytest.mark.parametrize("stops, pieces, expected", [
    (["END"], ["Hello E", "N", "D more"], ["Hello ", "", ""]),
    (["END"], ["Hello E", "xtra"], ["Hello ", "Extra"]),
    (["ab", "b"], ["xab"], ["x"]),
    ([], ["free", " text"], ["free", " text"]),
])
def test_stop_string_filter(stops, pieces, expected):
    text_filter = StopStringFilter(stops)
    assert [text_filter.push(piece) for piece in pieces] == expected


def test_stop_string_filter_flushes_what_was_not_a_stop():
    text_filter = StopStringFilter(["END"])
    assert text_filter.push("almost EN") == "almost "
    assert text_filter.flush() == "EN"


@pytest.mark.parametrize("path", ["/v1/completions", "/api/v1/generate"])
async def test_a_prompt_is_tokenized_once(http_server_client, manager, monkeypatch, path):
    loaded = manager.registry.find(TINY)
    prompts = []
    encode = loaded.encode

    def counting_encode(text):
        prompts.append(text)
        return encode(text)

    monkeypatch.setattr(loaded, "encode", counting_encode)
    body = {"model": TINY, "prompt" if path.startswith("/v1") else "inputs": "A cat sat on the mat",
            "max_tokens" if path.startswith("/v1") else "max_new_tokens": 2}
    response = await http_server_client.fetch(path, method="POST", body=json.dumps(body),
                                              headers={"Content-Type": "application/json"})
    assert response.code == 200
    assert prompts.count("A cat sat on the mat") == 1


async def test_text_parts_make_the_same_prompt_as_a_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France? "},
                                          {"type": "text", "text": "Answer in one sentence."}]}]
    plain = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=12)
    split = await client.chat.completions.create(model=DEFAULT, messages=parts, temperature=0, max_tokens=12, n=None)
    assert split.choices[0].message.content == plain.choices[0].message.content
    assert split.usage.prompt_tokens == plain.usage.prompt_tokens


@pytest.mark.parametrize("options, param", [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit to str.isdigit, not to int()
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}}}}},
     "response_format"),
])
async def test_fields_not_honoured_are_refused_by_name(client, manager, options, param):
    request = {"model": TINY, "messages": QUESTION, "max_tokens": 4, **options}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**request)
    assert caught.value.body["param"] == param, caught.value.body
    await wait_for_no_sessions(manager)


async def test_a_seed_makes_sampling_repeatable(client):
    async def sample(seed):
        reply = await client.completions.create(model=DEFAULT, prompt="Once upon a time", max_tokens=10,
                                                temperature=1.0, seed=seed)
        return reply.choices[0].text

    first, again, other = await sample(7), await sample(7), await sample(8)
    assert first == again != other


async def test_logit_bias_steers_every_token(client, manager):
    loaded = manager.registry.find(TINY)
    [token] = loaded.encode(" banana")[:1]
    reply = await client.completions.create(model=TINY, prompt="Hi", max_tokens=5, temperature=0,
                                            logit_bias={str(token): 100})
    assert reply.choices[0].text == loaded.tokenizer.decode([token] * 5)


async def test_json_schema_output_parses_and_validates(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
              "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}}
    messages = [{"role": "user", "content": "Name the capital of France and its population, as JSON."}]
    reply = await client.chat.completions.create(
        model=DEFAULT, messages=messages, temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"city", "population"}
    assert isinstance(answer["city"], str) and type(answer["population"]) is int
    assert reply.choices[0].finish_reason == "stop"

    # Sampled: plain decoding with this seed ends its object; with drafts the sample differs (the
    # distribution does not), and whatever it writes follows the grammar.
    for speculative in (False, True):
        stream = await client.chat.completions.create(
            model=DEFAULT, messages=[{"role": "user", "content": "List three colors in a JSON object."}],
            temperature=0.7, seed=3, max_tokens=80, stream=True, response_format={"type": "json_object"},
            extra_body={"speculative": speculative})
        chunks = [chunk async for chunk in stream if chunk.choices]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
        assert finish_reason == "stop" or speculative, text
        if finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{") and len(text) > 40, text


async def test_logprobs_of_chat_and_completions(client):
    reply = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=6,
                                                 logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content and len(content) == 6
    for entry in content:  # greedy: the chosen token is the likeliest, and log-probabilities are at most 0
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob and entry.logprob <= 0

    stream = await client.chat.completions.create(model=DEFAULT, messages=QUESTION, temperature=0, max_tokens=6,
                                                  logprobs=True, stream=True)
    streamed = [entry.token async for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert streamed == [entry.token for entry in content]

    completion = await client.completions.create(model=TINY, prompt="A cat", max_tokens=4, temperature=0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == len("A cat")
    plain = await client.chat.completions.create(model=TINY, messages=QUESTION, max_tokens=2)
    assert plain.choices[0].logprobs is None


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 40}}}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "required": ["zone"],
                   "properties": {"zone": {"type": "string", "maxLength": 40}}}}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


async def test_tool_calls_follow_the_tool_schema_and_feed_the_next_turn(client):
    """On Tiny Llama's random weights: only the grammar makes these calls well-formed."""
    reply = await client.chat.completions.create(model=TINY, messages=WEATHER_QUESTION, temperature=0,
                                                 max_tokens=60, tools=[WEATHER_TOOL, TIME_TOOL],
                                                 tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    assert set(arguments) == ({"city"} if call.function.name == "get_weather" else {"zone"})

    # Streamed, the call is named first, then its arguments come piece by piece as they are written.
    async with client.chat.completions.stream(
            model=TINY, messages=WEATHER_QUESTION, temperature=0, max_tokens=60, tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_time"}}) as named:
        events = [event async for event in named]
        streamed = await named.get_final_completion()
    argument_deltas = [event.arguments_delta for event in events
                       if event.type == "tool_calls.function.arguments.delta"]
    assert len(argument_deltas) > 3
    [streamed_call] = streamed.choices[0].message.tool_calls
    assert streamed_call.function.name == "get_time" and "zone" in json.loads(streamed_call.function.arguments)
    assert "".join(argument_deltas) == streamed_call.function.arguments
    assert streamed.choices[0].finish_reason == "tool_calls" and not streamed.choices[0].message.content

    follow_up = WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny, 21 C"}'}]
    answer = await client.chat.completions.create(model=TINY, messages=follow_up, temperature=0, max_tokens=8,
                                                  tools=[WEATHER_TOOL], tool_choice="none")
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=TINY, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL],
                                             tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.body["param"] == "tool_choice"


STRUCTURED_SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["user"], "properties": {"user": {
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120}}}}},
    {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "integer", "minimum": 0, "maximum": 99}},
    {"type": "object", "additionalProperties": False, "required": ["color"],
     "properties": {"color": {"enum": ["red", "green", "blue"]}}},
    {"type": "object", "additionalProperties": False, "required": ["id", "ok"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000}, "ok": {"type": "boolean"},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 5}}}},
    {"type": "object", "additionalProperties": False, "required": ["level", "points"], "properties": {
        "level": {"enum": ["low", "high"]},
        "points": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "additionalProperties": False, "required": ["x"],
            "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}}}}}},
]


async def test_fifty_sampled_structured_outputs_all_validate(client):
    """Tiny Llama's random weights at temperature 1: only the constraint makes the output valid."""

    async def generate(seed: int, schema: dict) -> str:
        reply = await client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "Data, please."}], temperature=1.0, seed=seed,
            max_tokens=150, response_format={"type": "json_schema", "json_schema": {"name": "data", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        return reply.choices[0].message.content

    for batch in range(5):
        jobs = [(10 * batch + index, STRUCTURED_SCHEMAS[index % len(STRUCTURED_SCHEMAS)]) for index in range(10)]
        texts = await asyncio.gather(*(generate(seed, schema) for seed, schema in jobs))
        for (seed, schema), text in zip(jobs, texts):
            jsonschema.validate(json.loads(text), schema)


async def test_a_client_at_its_session_limit_is_refused_before_its_prompt_is_tokenized(client, manager,
                                                                                        monkeypatch):
    import dataclasses

    await wait_for_no_sessions(manager)
    loaded = manager.registry.find(TINY)
    tokenized = []
    monkeypatch.setattr(loaded, "encode", lambda text: tokenized.append(text) or [])
    monkeypatch.setattr(manager.admission, "settings",
                        dataclasses.replace(manager.admission.settings, max_sessions_per_client=1))
    held = await manager.open_session("held", TINY, 32, "127.0.0.1")  # the client's one session
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(model=TINY, prompt="A cat sat on the mat", max_tokens=2)
    finally:
        await held.aclose("test done")
    assert caught.value.body["code"] == "too_many_sessions" and tokenized == []


def with_spec(monkeypatch, loaded, **changes):
    """Declares ``loaded``'s model with ``changes`` (e.g. a lower token limit) for one test."""
    import dataclasses

    monkeypatch.setattr(loaded, "spec", dataclasses.replace(loaded.spec, **changes))


@pytest.mark.parametrize("field, value", [
    ("temperature", "Infinity"), ("top_p", "NaN"), ("presence_penalty", "-Infinity"), ("seed", "1e999"),
    ("max_tokens", "Infinity"), ("logit_bias", '{"5": Infinity}'), ("logit_bias", '{"5": 1e999}'),
    ("response_format", '{"type": "json_schema", "json_schema": {"schema": {"type": "number", "maximum": NaN}}}'),
    ("tools", '[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": '
              '{"x": {"type": "number", "minimum": -Infinity}}}}}]'),
])
def test_a_number_that_is_not_finite_is_refused_anywhere_in_the_body(field, value):
    """Python's JSON parser reads Infinity, NaN and 1e999 (as infinity); no field takes them."""
    from handlers.openai_protocol import ChatCompletionRequest
    from sessions.errors import BadRequest

    body = json.loads('{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "%s": %s}' % (field, value))
    with pytest.raises(BadRequest, match="numbers must be finite") as refused:
        ChatCompletionRequest.parse(body)
    assert refused.value.param == field


async def test_a_body_with_a_number_that_is_not_finite_is_a_400_naming_its_field(http_server_client, manager):
    before = manager.open_session_count  # an earlier test's sessions may still be closing
    body = '{"model": "%s", "prompt": "Hi", "max_tokens": 2, "logit_bias": {"5": 1e999}}' % TINY
    response = await http_server_client.fetch("/v1/completions", method="POST", body=body, raise_error=False,
                                              headers={"Content-Type": "application/json"})
    error = json.loads(response.body)["error"]
    assert response.code == 400 and error["param"] == "logit_bias" and "finite" in error["message"]
    assert manager.open_session_count <= before


async def test_max_tokens_over_the_models_limit_is_refused_by_name(client, manager, monkeypatch):
    with_spec(monkeypatch, manager.registry.find(TINY), max_new_tokens_limit=8)
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=TINY, messages=QUESTION, temperature=0, **{field: 9})
        assert caught.value.body["param"] == field and "limit of 8" in caught.value.body["message"]
        assert caught.value.body["code"] == "invalid_request"
    reply = await client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens == 8
    await wait_for_no_sessions(manager)


async def test_a_request_without_max_tokens_stops_at_the_default(client, manager, monkeypatch):
    """Not at the end of the context: the default cap of the model's declaration, then the limit."""
    loaded = manager.registry.find(TINY)
    with_spec(monkeypatch, loaded, default_max_tokens=3)
    reply = await client.completions.create(model=TINY, prompt="Once upon a time", temperature=0)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    with_spec(monkeypatch, loaded, default_max_tokens=512, max_new_tokens_limit=4)
    stream = await client.chat.completions.create(model=TINY, messages=QUESTION, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-2].choices[0].finish_reason == "length"


async def test_a_developer_message_is_a_system_message(client):
    instructions = "You answer in French only."
    replies = [await client.chat.completions.create(
        model=DEFAULT, temperature=0, max_tokens=12,
        messages=[{"role": role, "content": instructions}, *QUESTION]) for role in ("system", "developer")]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens


def errors_answered(manager) -> float:
    """Errors answered to clients so far, of every code."""
    return sum(sample.value for metric in manager.metrics.registry.collect() if metric.name == "swarm_chat_errors"
               for sample in metric.samples if sample.name == "swarm_chat_errors_total")


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
async def test_a_client_that_leaves_while_its_prompt_is_tokenized_gets_nothing_and_no_error(
        ws_port, manager, monkeypatch, caplog, stream):
    """Its generation never starts: nothing is written, and no error is counted or logged."""
    import threading

    from handlers.openai_api import CompletionHandler

    loaded = manager.registry.find(TINY)
    encode, tokenizing, left = loaded.encode, threading.Event(), threading.Event()

    def encode_until_the_client_left(text):
        tokenizing.set()
        left.wait(30)
        return encode(text)

    handlers = []
    prepare, on_finish = CompletionHandler.prepare, CompletionHandler.on_finish
    monkeypatch.setattr(loaded, "encode", encode_until_the_client_left)
    monkeypatch.setattr(CompletionHandler, "prepare", lambda handler: handlers.append(handler) or prepare(handler))
    monkeypatch.setattr(CompletionHandler, "on_finish", lambda handler: setattr(handler, "ended", True) or
                        on_finish(handler))
    errors = errors_answered(manager)
    body = json.dumps({"model": TINY, "prompt": "A cat sat on the mat", "max_tokens": 4, "stream": stream})
    reader, writer = await send_raw_post(ws_port, "/v1/completions", body.encode())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not tokenizing.is_set():
        assert loop.time() < deadline, "the prompt was never tokenized"
        await asyncio.sleep(0.01)
    writer.close()
    [handler] = handlers
    while not handler.client_left:
        assert loop.time() < deadline, "the server never saw the client leave"
        await asyncio.sleep(0.01)
    left.set()
    while not getattr(handler, "ended", False):
        assert loop.time() < deadline, "the request never ended"
        await asyncio.sleep(0.01)
    assert errors_answered(manager) == errors
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    await wait_for_no_sessions(manager)


# The headers OpenAI's JavaScript client adds to each request (the last two when configured).
JS_CLIENT_HEADERS = ["x-stainless-os", "x-stainless-lang", "x-stainless-package-version", "x-stainless-runtime",
                     "x-stainless-runtime-version", "x-stainless-arch", "x-stainless-retry-count",
                     "x-stainless-timeout", "openai-organization", "openai-project"]


async def preflight(http_server_client, requested: str):
    """The answer to a browser's CORS preflight for a POST with the ``requested`` headers."""
    return await http_server_client.fetch("/v1/chat/completions", method="OPTIONS", headers={
        "Origin": "https://app.example.org", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": requested})


def allowed(response) -> list:
    return [name.strip().lower() for name in response.headers["Access-Control-Allow-Headers"].split(",")]


async def test_a_preflight_allows_the_headers_it_asks_for(http_server_client):
    response = await preflight(http_server_client, ",".join(["authorization", "content-type", *JS_CLIENT_HEADERS]))
    assert response.code == 204 and response.headers["Access-Control-Allow-Origin"] == "*"
    assert allowed(response) == ["authorization", "content-type", *JS_CLIENT_HEADERS]
    assert {"Origin", "Access-Control-Request-Headers"} <= {
        name.strip() for name in response.headers["Vary"].split(",")}  # a cache must not answer others with it


async def test_a_preflight_allows_only_header_names_and_few_of_them(http_server_client):
    from handlers.openai_api import MAX_CORS_EXTRA_HEADERS, MAX_CORS_HEADER_CHARS

    names = ["bad name", "bad\"quote", "x-" + "a" * MAX_CORS_HEADER_CHARS, "x-fine"]
    response = await preflight(http_server_client, ", ".join(names))
    assert allowed(response) == ["authorization", "content-type", "x-fine"]
    many = [f"x-header-{index}" for index in range(MAX_CORS_EXTRA_HEADERS + 10)]
    response = await preflight(http_server_client, ",".join(many))
    assert allowed(response) == ["authorization", "content-type", *many[:MAX_CORS_EXTRA_HEADERS]]
