"""The constraints of structured output: JSON schemas and grammars, bounded, then compiled once.

A schema is checked against ``sessions.engine.schema_limits`` before anything compiles it. What passes
is compiled under the library's own parser limits, in a small pool of threads of its own (never
the step executor), and each distinct grammar is compiled once per tokenizer: later generations
copy a compiled prototype.
"""

import asyncio
import collections
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Dict, Optional

import llguidance
import llguidance.hf

from sessions.engine.executor import BlockingExecutor
from sessions.engine.schema_limits import MAX_SCHEMA_BYTES, check_schema
from sessions.errors import InvalidRequest, ServerBusy
from sessions.requests import SamplingParams

logger = logging.getLogger(__name__)

MAX_GRAMMAR_BYTES = 2 * MAX_SCHEMA_BYTES  # a grammar: the tools' schemas and the call format around them

# The library's limits on one grammar (its defaults unless said): a compile or a step that would
# pass them fails rather than running on.
PARSER_LIMITS = dict(
    max_items_in_row=2_000,
    initial_lexer_fuel=1_000_000,  # about 20 ms of building the lexer
    step_lexer_fuel=200_000,  # about 15 ms of lexing per token
    step_max_items=50_000,  # about 2.5 ms of parsing per token
    max_lexer_states=50_000,  # 1 to 2 kB each (the default, 250,000, allows half a gigabyte)
    max_grammar_size=200_000,  # symbols (the default is 500,000)
    verbose_errors=False,  # the message names the limit, without the parser's state
)

COMPILE_THREADS = 2
MAX_WAITING_COMPILES = 8  # beyond this many compiles waiting for a thread, a new one is refused
CACHED_GRAMMARS = 8


def constrained(sampling: SamplingParams) -> bool:
    """Whether the generation's output is constrained by a JSON schema or a grammar."""
    return bool(sampling.json_schema or sampling.lark_grammar)


def constraint_field(sampling: SamplingParams) -> str:
    """The request field the constraint of ``sampling`` came from (what a refusal names)."""
    return "response_format" if sampling.json_schema else "tools"


def grammar_for(sampling: SamplingParams) -> str:
    """The grammar text of the constraint of ``sampling``; ``InvalidRequest`` naming its request
    field when it is over this server's limits."""
    param = constraint_field(sampling)
    if sampling.json_schema:
        try:
            schema = json.loads(sampling.json_schema)
        except (ValueError, RecursionError):
            raise InvalidRequest(f"{param}: the JSON schema is not valid JSON", param=param) from None
        check_schema(schema, param, sampling.json_schema)
        if isinstance(schema, dict):
            # Compact JSON: free whitespace would let a model pad its output with blanks forever.
            schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema)
        except (ValueError, TypeError) as error:
            raise InvalidRequest(f"{param}: unsupported JSON schema: {error}", param=param) from None
    size = len(sampling.lark_grammar.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(f"{param}: the tools' grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES} are "
                             "accepted", param=param)
    return llguidance.LLMatcher.grammar_from_lark(sampling.lark_grammar)


@functools.lru_cache(maxsize=8)
def guidance_tokenizer(tokenizer) -> "llguidance.LLTokenizer":
    """The constraint library's view of a model's vocabulary (built once per tokenizer)."""
    return llguidance.hf.from_tokenizer(tokenizer)


@dataclass(frozen=True)
class Constraint:
    """One generation's constraint: a matcher of its own and the size of the vocabulary it masks
    (the tokenizer's as the library sees it, which may be smaller than the model's logits)."""

    matcher: "llguidance.LLMatcher"
    vocab_size: int


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar compiled for one tokenizer: a prototype matcher, or why it cannot be enforced."""

    prototype: Optional["llguidance.LLMatcher"]
    vocab_size: int
    problem: str = ""

    def constraint(self, param: str) -> Constraint:
        """A fresh matcher for one generation; ``InvalidRequest`` naming ``param`` if the grammar failed."""
        if self.prototype is None:
            raise InvalidRequest(f"{param}: unsupported JSON schema: {self.problem}", param=param)
        return Constraint(self.prototype.deep_copy(), self.vocab_size)


def compile_grammar(tokenizer, grammar: str) -> CompiledGrammar:
    """Compiles ``grammar`` for ``tokenizer`` under ``PARSER_LIMITS`` (blocking: the compiler's
    threads run it). A warning fails it too: it names a keyword that would go unenforced."""
    started = time.perf_counter()
    vocabulary = guidance_tokenizer(tokenizer)
    matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0, limits=llguidance.LLParserLimits(**PARSER_LIMITS))
    problems = [matcher.get_error()] if matcher.is_error() else matcher.get_grammar_warnings()
    logger.debug("Compiled a grammar of %d characters in %.3f s", len(grammar), time.perf_counter() - started)
    return CompiledGrammar(None if problems else matcher, vocabulary.vocab_size, "; ".join(problems))


class GrammarCompiler:
    """Compiles the constraints of generations in ``workers`` threads of its own, each distinct
    grammar once per tokenizer (the last ``cache_entries`` are kept; two generations asking at
    once for one grammar share its compile). At most ``max_waiting`` compiles wait for a thread:
    beyond that a new one is refused with ``ServerBusy``, a retry may pass. Used on the event loop.
    """

    def __init__(self, workers: int = COMPILE_THREADS, max_waiting: int = MAX_WAITING_COMPILES,
                 cache_entries: int = CACHED_GRAMMARS):
        self._pool = BlockingExecutor(workers, name="grammar", background=True)
        self._max_waiting = max_waiting
        self._cache_entries = cache_entries
        self._cache: "collections.OrderedDict[tuple, CompiledGrammar]" = collections.OrderedDict()
        self._compiling: Dict[tuple, "asyncio.Future[CompiledGrammar]"] = {}

    async def compile(self, tokenizer, sampling: SamplingParams) -> Constraint:
        """The constraint of ``sampling`` for a model of ``tokenizer``, ready for one generation.
        ``InvalidRequest`` naming the request field when it is over the limits or not enforceable."""
        param = constraint_field(sampling)
        source = sampling.json_schema or sampling.lark_grammar
        key = (tokenizer, param, hashlib.sha256(source.encode()).digest())
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
        else:
            # Shielded: a waiter that goes away leaves the compile to finish for the others and the cache.
            compiled = await asyncio.shield(self._compile(key, tokenizer, sampling))
        return compiled.constraint(param)

    def _compile(self, key: tuple, tokenizer, sampling: SamplingParams) -> "asyncio.Future[CompiledGrammar]":
        running = self._compiling.get(key)
        if running is None:
            grammar = grammar_for(sampling)  # within the limits, or refused before it takes a thread
            if self._pool.queue_depth >= self._max_waiting:
                raise ServerBusy("The server is compiling as many JSON schemas and grammars as it queues; "
                                 "retry shortly")
            running = self._pool.run(compile_grammar, tokenizer, grammar)
            self._compiling[key] = running
            running.add_done_callback(functools.partial(self._compiled, key))
        return running

    def _compiled(self, key: tuple, done: "asyncio.Future[CompiledGrammar]") -> None:
        del self._compiling[key]
        if not done.cancelled() and done.exception() is None:
            self._cache[key] = done.result()
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)

    def shutdown(self) -> None:
        """Drops queued compiles; a running one finishes in its thread."""
        self._pool.shutdown()


@functools.lru_cache(maxsize=1)
def shared_compiler() -> GrammarCompiler:
    """The compiler of token streams made without one (a stream driven directly, as benches do)."""
    return GrammarCompiler()
