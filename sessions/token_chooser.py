"""How one generation picks each next token from the logits the output head computed.

In order: the client's logit bias, OpenAI's presence and frequency penalties (on the tokens
this generation chose), transformers' repetition penalty, the constraint of a JSON schema or a
grammar (tokens that cannot continue valid output are masked out), then greedy choice or sampling with
temperature, top-k, top-p and min-p, from a seeded generator when a seed is given. All of it
runs on this machine: none of it costs the swarm any work.
"""

import collections
import functools
import json
from typing import Counter, Optional

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sessions.errors import InvalidRequest
from sessions.requests import ChosenTokenLogprobs, SamplingParams, TokenLogprob


def logits_processors(sampling: SamplingParams) -> LogitsProcessorList:
    """The transformers warpers that ``sampling`` calls for (min-p is applied apart)."""
    processors = LogitsProcessorList()
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p is not None and sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


@functools.lru_cache(maxsize=8)
def guidance_tokenizer(tokenizer) -> "llguidance.LLTokenizer":
    """The constraint library's view of a model's vocabulary (built once per tokenizer)."""
    return llguidance.hf.from_tokenizer(tokenizer)


def constraint_matcher(tokenizer, sampling: SamplingParams) -> "llguidance.LLMatcher":
    """A matcher that accepts only JSON valid against ``sampling.json_schema``, or only text of
    ``sampling.lark_grammar``; ``InvalidRequest`` naming the request field at fault when the
    constraint is not one this server can enforce."""
    param = "response_format" if sampling.json_schema else "tools"
    try:
        if sampling.json_schema:
            schema = json.loads(sampling.json_schema)
            if isinstance(schema, dict):
                # Compact JSON: free whitespace would let a model pad its output with blanks forever.
                schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(sampling.lark_grammar)
        # An error makes the schema unusable; a warning names a keyword that would go unenforced.
        problems = [llguidance.LLMatcher.validate_grammar(grammar, None),
                    *llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)[1]]
    except (ValueError, TypeError, RuntimeError) as error:
        problems = [str(error)]
    if any(problems):
        raise InvalidRequest(f"{param}: unsupported JSON schema: {'; '.join(filter(None, problems))}", param=param)
    matcher = llguidance.LLMatcher(guidance_tokenizer(tokenizer), grammar)
    if matcher.is_error():
        raise InvalidRequest(f"{param}: unsupported JSON schema: {matcher.get_error()}", param=param)
    return matcher


class TokenChooser:
    """The token choices of one generation: its sampling settings and what it has chosen so far."""

    def __init__(self, sampling: SamplingParams, tokenizer, vocab_size: int):
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.last_logprobs: Optional[ChosenTokenLogprobs] = None  # of the last choice, when asked for
        self._processors = logits_processors(sampling)
        self._repetition = (RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
                            if sampling.repetition_penalty not in (None, 1.0) else None)
        self._generator: Optional[torch.Generator] = None
        if sampling.seed is not None:
            self._generator = torch.Generator().manual_seed(sampling.seed)
        self._bias: Optional[torch.Tensor] = None
        if sampling.logit_bias:
            self._bias = torch.zeros(vocab_size)
            for token_id, bias in sampling.logit_bias:
                if not 0 <= token_id < vocab_size:
                    raise InvalidRequest(f"logit_bias: token {token_id} is not in this model's vocabulary "
                                         f"(0 to {vocab_size - 1})", param="logit_bias")
                self._bias[token_id] = bias
        self._chosen: Counter[int] = collections.Counter()
        constrained = sampling.json_schema or sampling.lark_grammar
        self._matcher = constraint_matcher(tokenizer, sampling) if constrained else None
        self._mask = llguidance.numpy.allocate_token_bitmask(1, vocab_size) if self._matcher else None

    def _allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """Which tokens may come next under the JSON constraint (one bit per token from the matcher)."""
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._mask, 0)
        allowed = numpy.unpackbits(self._mask.view(numpy.uint8), bitorder="little")[:vocab_size]
        return torch.from_numpy(allowed.astype(bool))

    def choose(self, token_ids: torch.Tensor, logits: torch.Tensor) -> int:
        """The next token, given every token so far and the next token's logits (1 × vocabulary)."""
        sampling = self.sampling
        scores = logits + self._bias if self._bias is not None else logits
        if self._chosen and (sampling.presence_penalty or sampling.frequency_penalty):
            ids = torch.tensor(list(self._chosen))
            counts = torch.tensor(list(self._chosen.values()), dtype=scores.dtype)
            scores = scores.clone()
            scores[0, ids] -= sampling.frequency_penalty * counts + sampling.presence_penalty
        if self._repetition is not None:
            scores = self._repetition(token_ids, scores)
        if self._matcher is not None:
            scores = scores.masked_fill(~self._allowed_tokens(scores.shape[-1]), float("-inf"))
        if sampling.greedy:
            token = int(scores.argmax(dim=-1)[0])
        else:
            scores = self._processors(token_ids, scores)
            probabilities = torch.softmax(scores, dim=-1)
            if sampling.min_p:
                probabilities = torch.where(probabilities < sampling.min_p * probabilities.max(), 0.0, probabilities)
            token = int(torch.multinomial(probabilities, num_samples=1, generator=self._generator)[0, 0])
        self._chosen[token] += 1
        if self._matcher is not None:
            self._matcher.consume_token(token)
        if sampling.logprobs is not None:
            self.last_logprobs = self._logprobs(logits, token, sampling.logprobs)
        return token

    def _logprobs(self, logits: torch.Tensor, token: int, alternatives: int) -> ChosenTokenLogprobs:
        """The model's own log-probabilities (from the raw logits) of ``token`` and the likeliest ones."""
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        top = torch.topk(logprobs, alternatives) if alternatives else None

        def described(token_id: int, logprob: float) -> TokenLogprob:
            return TokenLogprob(self.tokenizer.decode([token_id]), float(logprob))

        return ChosenTokenLogprobs(
            described(token, logprobs[token]),
            tuple(described(int(index), value) for value, index in zip(*top)) if top is not None else ())
