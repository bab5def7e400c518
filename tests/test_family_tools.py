"""Tool calls in each model's own syntax: the grammar, reading and writing calls per syntax (fast,
no swarm), and the families' tiny models calling tools through the OpenAI API on the real swarm."""

import asyncio
import json
import random

import jsonschema
import llguidance
import llguidance.numpy
import numpy
import openai
import pytest
from transformers import AutoTokenizer

from handlers.openai_protocol import ChatCompletionRequest
from sessions.engine.grammar import compile_grammar, grammar_for
from sessions.errors import InvalidRequest
from sessions.formats.tool_syntax import HERMES, LLAMA_JSON, SERVER, ParsedCall
from sessions.requests import SamplingParams
from tests.helpers import wait_for_no_sessions
from tests.template_reference import reference_renderings

SYNTAXES = [HERMES, LLAMA_JSON, SERVER]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {
    "city": {"type": "string", "maxLength": 24}, "days": {"type": "integer", "minimum": 1, "maximum": 14}}}
TIME = {"type": "object", "required": ["zone"], "properties": {"zone": {"enum": ["CET", "UTC", "JST"]}}}
FUNCTIONS = [("get_weather", WEATHER), ("get_time", TIME)]
SCHEMAS = dict(FUNCTIONS)
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name.replace('_', ' ')}.",
                                           "parameters": parameters}} for name, parameters in FUNCTIONS]
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
# Each family's tool syntax, as found in its chat template (Mistral's model has SmolLM2's, without tools).
FAMILY_SYNTAX = {"llama3": LLAMA_JSON, "qwen2": HERMES, "qwen3": HERMES, "mistral": SERVER}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def matcher(tokenizer, syntax, required: bool, functions=FUNCTIONS) -> "llguidance.LLMatcher":
    grammar = syntax.grammar(functions, required)
    compiled = compile_grammar(tokenizer, grammar_for(SamplingParams(lark_grammar=grammar)))
    assert compiled.problem == ""
    return compiled.constraint("tools").matcher


def accepts(tokenizer, syntax, required: bool, text: str) -> bool:
    """Whether the grammar lets a reply be exactly ``text``."""
    checked = matcher(tokenizer, syntax, required)
    return checked.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) and checked.is_accepting()


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda syntax: syntax.name)
def test_a_call_is_written_and_read_back_in_the_syntax(syntax):
    written = syntax.write("get_weather", {"city": "Zürich", "days": 2})
    expected = {HERMES: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}'
                        '\n</tool_call>',
                LLAMA_JSON: '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 2}}',
                SERVER: '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}</tool_call>'}
    assert written == expected[syntax]
    assert syntax.parse(written) == ParsedCall("get_weather", {"city": "Zürich", "days": 2})
    assert syntax.starts_call(written) and not syntax.starts_call("Sunny.")
    for not_a_call in (written[:-3], "Sunny.", written.replace(syntax.arguments_key, "args"), ""):
        assert syntax.parse(not_a_call) is None


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda syntax: syntax.name)
def test_the_grammar_allows_only_calls_of_declared_tools_with_valid_arguments(tokenizer, syntax):
    for required in (True, False):
        assert accepts(tokenizer, syntax, required, syntax.write("get_weather", {"city": "Paris"}))
        assert accepts(tokenizer, syntax, required, syntax.write("get_time", {"zone": "JST"}))
        assert not accepts(tokenizer, syntax, required, syntax.write("get_news", {"city": "Paris"}))  # not declared
        assert not accepts(tokenizer, syntax, required, syntax.write("get_weather", {"city": "Paris", "days": 99}))
        assert not accepts(tokenizer, syntax, required, syntax.write("get_weather", {"town": "Paris"}))
        assert not accepts(tokenizer, syntax, required, syntax.write("get_time", {"zone": "PST"}))
        # The JSON is written as the templates write it: compact JSON is not the model's.
        assert not accepts(tokenizer, syntax, required, syntax.opening + '{"name":"get_time","'
                           + syntax.arguments_key + '":{"zone":"JST"}}' + syntax.closing)
    assert not accepts(tokenizer, syntax, True, "Sunny in Paris.")
    assert accepts(tokenizer, syntax, False, "Sunny in Paris.")
    assert not accepts(tokenizer, syntax, False, syntax.first_character + " is how it starts.")  # not like a call


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda syntax: syntax.name)
def test_random_tokens_under_the_grammar_always_make_a_valid_call(tokenizer, syntax):
    """What a model of random weights does: any token the grammar allows, at random."""
    for seed in range(8):
        rng = random.Random(seed)
        walk = matcher(tokenizer, syntax, required=True)
        mask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        tokens = []
        while True:
            llguidance.numpy.fill_next_token_bitmask(walk, mask, 0)
            allowed = numpy.flatnonzero(numpy.unpackbits(mask.view(numpy.uint8), bitorder="little"))
            if walk.is_stopped() or tokenizer.eos_token_id in allowed:
                break
            assert len(tokens) < 400, tokenizer.decode(tokens)
            token = int(rng.choice(allowed))
            assert walk.consume_token(token)
            tokens.append(token)
        assert allowed.tolist() == [tokenizer.eos_token_id]  # the reply ends with the call
        call = syntax.parse(tokenizer.decode(tokens))
        assert call is not None and call.name in SCHEMAS, tokenizer.decode(tokens)
        jsonschema.validate(call.arguments, SCHEMAS[call.name])


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda syntax: syntax.name)
def test_a_request_s_grammar_is_the_model_s_syntax_within_the_schema_limits(syntax):
    body = {"model": "m", "messages": QUESTION, "tools": TOOLS, "tool_choice": "required"}
    sampling = ChatCompletionRequest.parse(body).sampling_params(syntax)
    assert sampling.lark_grammar == syntax.grammar(FUNCTIONS, required=True)
    named = dict(body, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert ChatCompletionRequest.parse(named).sampling_params(syntax).lark_grammar == syntax.grammar(
        FUNCTIONS[1:], required=True)
    assert ChatCompletionRequest.parse(dict(body, tool_choice="none")).sampling_params(syntax).lark_grammar is None
    # Schemas that each double the one before: refused before anything compiles them.
    definitions = {"d0": {"type": "integer"}}
    for level in range(1, 21):
        definitions[f"d{level}"] = {"allOf": [{"$ref": f"#/$defs/d{level - 1}"}, {"$ref": f"#/$defs/d{level - 1}"}]}
    bomb = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": definitions, "properties": {"x": {"$ref": "#/$defs/d20"}}}}}]
    with pytest.raises(InvalidRequest, match="nodes") as refused:
        ChatCompletionRequest.parse(dict(body, tools=bomb)).sampling_params(syntax)
    assert refused.value.param == "tools"


def test_a_conversation_with_calls_as_templates_take_it():
    call = {"id": "call_7", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}
    body = {"model": "m", "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "messages": [{"role": "developer", "content": "Be brief."}, *QUESTION,
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_7", "content": "12:00"},
                         {"role": "assistant", "tool_calls": [dict(call, id=None, function={
                             "name": "get_weather", "arguments": "not JSON"})]}]}
    request = ChatCompletionRequest.parse(body)
    assert request.template_messages() == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION[0]["content"]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_7", "name": "get_time"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "not JSON"}}]}]
    assert request.template_tools() == [TOOLS[1]]  # only the tool the reply may call


# The real swarm: each family's tiny model, its template and its tool syntax.

@pytest.fixture
def client(ws_port):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", max_retries=0)


def checked_call(call) -> dict:
    """The arguments of an OpenAI ``tool_calls`` entry, checked against its tool's schema."""
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in SCHEMAS
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


async def reference_prompt_tokens(loaded, default_model_dir, body: dict, thinking: bool) -> int:
    """The tokens of the prompt of ``body`` as transformers 4.57 renders it with the model's template."""
    request = ChatCompletionRequest.parse(body)
    case = {"template": loaded.tokenizer.chat_template, "messages": request.template_messages(),
            "tools": request.template_tools(), "add_generation_prompt": True,
            "options": {} if thinking else {"enable_thinking": False}}
    [rendered] = await asyncio.get_running_loop().run_in_executor(None, reference_renderings, default_model_dir,
                                                                  [case])
    return len(loaded.encode(rendered["text"]))


@pytest.mark.parametrize("family", list(FAMILY_SYNTAX))
async def test_each_family_calls_tools_in_its_own_syntax(client, manager, default_model_dir, family):
    """Random weights: only the grammar makes these calls well-formed."""
    model = f"tests/tiny-{family}"
    loaded = manager.registry.find(model)
    assert loaded.tool_syntax == FAMILY_SYNTAX[family]
    assert (loaded.tool_template is not None) == (family != "mistral")
    body = {"model": model, "messages": QUESTION, "tools": TOOLS, "tool_choice": "required", "temperature": 0,
            "max_tokens": 80}
    reply = await client.chat.completions.create(**body)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    checked_call(call)
    if loaded.tool_template is not None:  # the prompt is the template's, tools included, as transformers writes it
        assert reply.usage.prompt_tokens == await reference_prompt_tokens(loaded, default_model_dir, body,
                                                                          thinking=False)

    stream = await client.chat.completions.create(**dict(
        body, temperature=1.0, seed=3, stream=True, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    chunks = [chunk async for chunk in stream if chunk.choices]
    first, *more = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or [])]
    assert more and all(piece.id is None and piece.function.name is None for piece in more)  # arguments as written
    streamed = first.model_copy(update={"function": first.function.model_copy(update={
        "arguments": first.function.arguments + "".join(piece.function.arguments for piece in more)})})
    assert streamed.function.name == "get_time" and checked_call(streamed)["zone"] in ("CET", "UTC", "JST")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)

    follow_up = dict(body, tool_choice="auto", temperature=1.0, seed=5, max_tokens=8, messages=QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny, 21 °C"}'}])
    answer = await client.chat.completions.create(**follow_up)
    choice = answer.choices[0]
    if choice.finish_reason == "tool_calls":
        checked_call(choice.message.tool_calls[0])
    else:  # free text never begins like a call
        assert choice.message.content and not loaded.tool_syntax.starts_call(choice.message.content)
    if loaded.tool_template is not None:
        assert answer.usage.prompt_tokens == await reference_prompt_tokens(loaded, default_model_dir, follow_up,
                                                                           thinking=False)
    await wait_for_no_sessions(manager)


async def test_a_conversation_the_template_refuses_is_a_400(client, manager):
    calls = [{"id": f"call_{index}", "type": "function",
              "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}} for index in range(2)]
    before = manager.open_session_count
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="tests/tiny-llama3", tools=TOOLS, max_tokens=4, messages=QUESTION + [
            {"role": "assistant", "content": None, "tool_calls": calls}])
    assert refused.value.body["param"] == "messages"
    assert "only supports single tool-calls" in refused.value.body["message"]
    assert manager.open_session_count <= before
