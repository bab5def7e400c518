"""Structured output's constraints: schema limits (compile bombs), one compile per grammar, the
compiler's own threads and queue, the library's parser limits, and the mask's vocabulary size."""

import asyncio
import json
import threading
import uuid

import openai
import pytest
import torch
from transformers import AutoTokenizer

from handlers.openai_protocol import ChatCompletionRequest
from sessions.engine import grammar, schema_limits
from sessions.engine.grammar import CompiledGrammar, GrammarCompiler, compile_grammar, grammar_for
from sessions.engine.schema_limits import check_schema
from sessions.engine.token_chooser import TokenChooser
from sessions.errors import InvalidRequest, ServerBusy
from sessions.requests import SamplingParams
from tests.helpers import wait_for_no_sessions

TINY = "tests/tiny-llama"
DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its context holds the tools' description of a bomb
ORDINARY = {"type": "object", "additionalProperties": False, "required": ["ok"],
            "properties": {"ok": {"type": "boolean"}}}


def nested_allof_bomb(levels: int, by_anchor: bool = False) -> dict:
    """Each definition is allOf two references to the one before: written out, it doubles per level
    (a string with a pattern at the bottom makes the library intersect every copy's regex).
    ``by_anchor``: the references name anchors, so that the bomb works wherever it is embedded."""
    definitions = {"d0": {"type": "string", "pattern": "a+b"}}
    for level in range(1, levels + 1):
        previous = {"$ref": f"#d{level - 1}" if by_anchor else f"#/$defs/d{level - 1}"}
        definitions[f"d{level}"] = {"allOf": [previous, dict(previous)]}
    if by_anchor:
        for name, definition in definitions.items():
            definition["$anchor"] = name
    return {"$defs": definitions, "$ref": f"#d{levels}" if by_anchor else f"#/$defs/d{levels}"}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "data", "schema": schema}}


def tool_with(parameters: dict) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


class Compiles:
    """Stands in for ``compile_grammar``: records each call's thread, then compiles for real (or not)."""

    def __init__(self, real: bool = True):
        self.threads = []
        self._real = real

    def __call__(self, tokenizer, text: str) -> CompiledGrammar:
        self.threads.append(threading.current_thread().name)
        if self._real:
            return compile_grammar(tokenizer, text)
        return CompiledGrammar(None, 0, "not compiled in this test")


@pytest.fixture
def compiles(monkeypatch):
    """``compiles(real=True)``: from now on, every compile is recorded (and done only if ``real``)."""

    def spy(real: bool = True) -> Compiles:
        recorder = Compiles(real)
        monkeypatch.setattr(grammar, "compile_grammar", recorder)
        return recorder

    return spy


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("levels", [20, 24])
async def test_a_nested_allof_bomb_is_refused_before_anything_compiles(compiles, levels):
    compiled = compiles(real=False)
    bomb = SamplingParams(json_schema=json.dumps(nested_allof_bomb(levels)))
    with pytest.raises(InvalidRequest, match="more than 10000 nodes") as refused:
        await GrammarCompiler().compile(None, bomb)
    assert refused.value.param == "response_format" and compiled.threads == []


def test_a_bomb_in_a_tool_s_parameters_is_refused_naming_tools():
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}],
            "tools": [tool_with({"type": "object", "properties": {"x": nested_allof_bomb(20, by_anchor=True)}})]}
    request = ChatCompletionRequest.parse(body)
    with pytest.raises(InvalidRequest, match="more than 10000 nodes") as refused:
        request.sampling_params()
    assert refused.value.param == "tools"


def chain(levels: int) -> dict:
    """Objects nested ``levels`` deep through a chain of definitions."""
    definitions = {"d0": {"type": "integer"}}
    for level in range(1, levels + 1):
        definitions[f"d{level}"] = {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{level - 1}"}}}
    return {"$defs": definitions, "$ref": f"#/$defs/d{levels}"}


@pytest.mark.parametrize("schema, problem", [
    ({"type": "object", "properties": {f"p{index}": {"type": "integer"} for index in range(3000)}}, "bytes"),
    ({"$defs": {"a": {"type": "integer"}}, "type": "array",
      "prefixItems": [{"$ref": "#/$defs/a"}] * (schema_limits.MAX_REFS + 1)}, r"\$ref"),
    (chain(200), "nests deeper"),  # the library's own compile overflows its stack near 1,000
    # allOf over anyOf: every combination of branches is intersected (10^4 of them here).
    ({"allOf": [{"anyOf": [{"type": "string", "format": "uri", "minLength": branch} for branch in range(10)]}] * 4},
     "more than 10000 nodes"),
    ({"$ref": "#/$defs/missing"}, "does not point into it"),
    ({"$ref": "http://example.com/schema.json"}, "does not point into it"),
])
def test_schemas_over_the_limits_are_refused_naming_the_field(schema, problem):
    with pytest.raises(InvalidRequest, match=problem) as refused:
        check_schema(schema, "response_format")
    assert refused.value.param == "response_format"


@pytest.mark.parametrize("schema", [
    ORDINARY,
    {"type": "object", "properties": {f"p{index}": {"type": "integer"} for index in range(1500)}},
    {"$defs": {"node": {"type": "object", "properties": {  # recursive: compiled as a rule, counted once
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
     "$ref": "#/$defs/node"},
    {"type": "object", "properties": {"next": {"$ref": "#"}}},
    {"$defs": {"a": {"$id": "urn:a", "type": "integer"}}, "$ref": "urn:a"},
    {"$defs": {"a": {"$anchor": "it", "type": "integer"}}, "$ref": "#it"},
    {"$defs": {"a/b c": {"type": "integer"}}, "$ref": "#/$defs/a~1b%20c"},
    {"allOf": [{"anyOf": [{"type": "string", "format": "uri", "minLength": branch} for branch in range(10)]}] * 2},
    chain(30),
    nested_allof_bomb(6),
])
def test_ordinary_schemas_pass(schema):
    check_schema(schema, "response_format")


async def test_each_distinct_grammar_compiles_once(compiles, tokenizer):
    compiled = compiles()
    compiler = GrammarCompiler(cache_entries=2)
    sampling = SamplingParams(json_schema=json.dumps(ORDINARY))
    first = await compiler.compile(tokenizer, sampling)
    # The same schema again, from another request, and twice at once.
    again = await compiler.compile(tokenizer, SamplingParams(json_schema=json.dumps(ORDINARY)))
    together = await asyncio.gather(*(compiler.compile(tokenizer, SamplingParams(json_schema=json.dumps(
        {"type": "array", "maxItems": 2}))) for _ in range(2)))
    assert len(compiled.threads) == 2
    # Each generation gets a matcher of its own.
    matchers = {id(first.matcher), id(again.matcher), *(id(constraint.matcher) for constraint in together)}
    assert len(matchers) == 4
    # The cache keeps the last two: a third schema pushes the first out.
    await compiler.compile(tokenizer, SamplingParams(json_schema=json.dumps({"type": "integer"})))
    await compiler.compile(tokenizer, sampling)
    assert len(compiled.threads) == 4
    compiler.shutdown()


class HeldCompile:
    """A compile that waits until ``release`` (a prototype standing in for a matcher)."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()
        self.calls = 0

    def __call__(self, tokenizer, text: str) -> CompiledGrammar:
        self.calls += 1
        self.started.set()
        self.release.wait(30)
        return CompiledGrammar(self, 1)

    def deep_copy(self) -> "HeldCompile":
        return self


async def test_a_full_compile_queue_refuses_new_compiles_as_busy(monkeypatch):
    held = HeldCompile()
    monkeypatch.setattr(grammar, "compile_grammar", held)
    compiler = GrammarCompiler(workers=1, max_waiting=1)

    def schema(index: int) -> SamplingParams:
        return SamplingParams(json_schema=json.dumps({"type": "integer", "minimum": index}))

    running = asyncio.ensure_future(compiler.compile(None, schema(1)))
    while not held.started.is_set():  # the first compile has the one thread
        await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(compiler.compile(None, schema(2)))
    await asyncio.sleep(0)
    with pytest.raises(ServerBusy) as refused:
        await compiler.compile(None, schema(3))
    assert refused.value.retryable
    # A schema already being compiled waits for that compile rather than queueing another.
    same = asyncio.ensure_future(compiler.compile(None, schema(1)))
    held.release.set()
    assert all(constraint.vocab_size == 1 for constraint in await asyncio.gather(running, waiting, same))
    assert held.calls == 2
    compiler.shutdown()


def test_the_library_s_parser_limits_apply(monkeypatch, tokenizer):
    text = grammar_for(SamplingParams(json_schema=json.dumps(ORDINARY)))
    assert compile_grammar(tokenizer, text).problem == ""
    monkeypatch.setattr(grammar, "PARSER_LIMITS", {**grammar.PARSER_LIMITS, "max_grammar_size": 2})
    with pytest.raises(InvalidRequest, match="grammar size") as refused:
        compile_grammar(tokenizer, text).constraint("response_format")
    assert refused.value.param == "response_format"


def test_the_mask_has_the_tokenizer_s_size_and_padding_tokens_never_come(tokenizer):
    """Models pad their output layer past the tokenizer's vocabulary (BLOOM 250,880 for 250,680,
    Phi-3 32,064 for 32,011): the logits are longer than the library's vocabulary."""
    sampling = SamplingParams(json_schema=json.dumps(ORDINARY))
    constraint = compile_grammar(tokenizer, grammar_for(sampling)).constraint("response_format")
    known = constraint.vocab_size
    padded = known + 64
    chooser = TokenChooser(sampling, tokenizer, padded, constraint)
    logits = torch.zeros((1, padded))
    logits[0, known:] = 100.0  # the padding tokens are the likeliest: only the mask keeps them out
    tokens = []
    while not tokens or tokens[-1] != tokenizer.eos_token_id:
        tokens.append(chooser.choose(torch.tensor([tokens], dtype=torch.int64), logits))
        assert tokens[-1] < known and len(tokens) < 50
    assert set(json.loads(tokenizer.decode(tokens[:-1]))) == {"ok"}


def test_a_constrained_chooser_needs_its_compiled_constraint():
    with pytest.raises(ValueError, match="compiled beforehand"):
        TokenChooser(SamplingParams(json_schema=json.dumps(ORDINARY)), tokenizer=None, vocab_size=4)


@pytest.fixture
def client(ws_port):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("field", ["response_format", "tools"])
async def test_a_bomb_is_a_400_naming_its_field_and_nothing_compiles(client, manager, compiles, field):
    compiled = compiles()
    options = ({"response_format": schema_format(nested_allof_bomb(20))} if field == "response_format"
               else {"tools": [tool_with(nested_allof_bomb(20, by_anchor=True))], "tool_choice": "required"})
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=DEFAULT, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=8, **options)
    assert refused.value.body["param"] == field and "nodes" in refused.value.body["message"]
    assert compiled.threads == []
    await wait_for_no_sessions(manager)


async def test_two_requests_with_one_schema_compile_it_once_in_the_compiler_s_threads(client, manager, compiles):
    compiled = compiles()
    schema = {"type": "object", "additionalProperties": False, "required": ["n" + uuid.uuid4().hex[:8]],
              "properties": {}}
    schema["properties"][schema["required"][0]] = {"type": "integer", "minimum": 0, "maximum": 9}
    for seed in (1, 2):
        reply = await client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "Data, please."}], temperature=1.0, seed=seed,
            max_tokens=40, response_format=schema_format(schema))
        assert reply.choices[0].finish_reason == "stop"
        assert set(json.loads(reply.choices[0].message.content)) == set(schema["required"])
    assert len(compiled.threads) == 1 and compiled.threads[0].startswith("grammar")
    await wait_for_no_sessions(manager)


async def test_a_schema_the_compiler_refuses_is_a_400_before_the_prompt_is_tokenized(client, manager, monkeypatch):
    loaded = manager.registry.find(TINY)
    tokenized = []
    original = loaded.encode
    monkeypatch.setattr(loaded, "encode", lambda text: tokenized.append(text) or original(text))
    before = manager.open_session_count  # an earlier test's sessions may still be closing
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                             response_format=schema_format({"not": {"type": "string"}}))
    assert refused.value.body["param"] == "response_format" and "not" in refused.value.body["message"]
    assert tokenized == [] and manager.open_session_count <= before
