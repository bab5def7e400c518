"""How one generation picks each next token from the logits the output head computed.

In order: the client's logit bias, OpenAI's presence and frequency penalties (on the tokens
this generation chose), transformers' repetition penalty, the constraint of a JSON schema or a
grammar (tokens that cannot continue valid output are masked out; the constraint comes compiled,
see ``sessions.engine.grammar``), then greedy choice or sampling with temperature, top-k, top-p and
min-p, from a seeded generator when a seed is given. All of it runs on this machine: none of it
costs the swarm any work.
"""

import collections
from typing import Counter, List, Optional

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

from sessions.engine.grammar import Constraint, constrained
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


class TokenChooser:
    """The token choices of one generation: its sampling settings and what it has chosen so far.

    ``vocab_size`` is the size of the model's logits; a constrained generation brings its
    ``constraint``, compiled beforehand.
    """

    def __init__(self, sampling: SamplingParams, tokenizer, vocab_size: int, constraint: Optional[Constraint] = None):
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
        if constrained(sampling) and constraint is None:
            raise ValueError("a constrained generation needs its constraint compiled beforehand")
        self._constraint = constraint if constrained(sampling) else None
        # The mask has the library's vocabulary size, which may differ from the logits'.
        self._mask = (llguidance.numpy.allocate_token_bitmask(1, self._constraint.vocab_size)
                      if self._constraint is not None else None)

    def _allowed_tokens(self, logits_size: int) -> torch.Tensor:
        """Which of the ``logits_size`` tokens may come next under the constraint (one bit per
        token from the matcher). Tokens past the tokenizer's vocabulary (models pad their output
        layer) never are."""
        llguidance.numpy.fill_next_token_bitmask(self._constraint.matcher, self._mask, 0)
        known = numpy.unpackbits(self._mask.view(numpy.uint8), bitorder="little")[:self._constraint.vocab_size]
        allowed = numpy.zeros(logits_size, dtype=bool)
        shared = min(logits_size, len(known))
        allowed[:shared] = known[:shared]
        return torch.from_numpy(allowed)

    def forced_tokens(self, certain_only: bool = False) -> List[int]:
        """The tokens the constraint's grammar forces next, as its tokenizer would write them
        (llguidance's fast-forward: the model may still spell them otherwise); none when free.

        ``certain_only``: just those, from the first, that the constraint allows alone, each
        after the ones before: whatever the logits, sampling or bias, they are the tokens chosen."""
        if self._constraint is None or self._constraint.matcher.is_stopped():
            return []
        forced = list(self._constraint.matcher.compute_ff_tokens())
        if not certain_only:
            return forced
        matcher, certain = self._constraint.matcher, []
        for token in forced:
            allowed = self._allowed_tokens(self._constraint.vocab_size)
            if int(allowed.sum()) != 1 or not allowed[token] or not matcher.consume_token(token):
                break
            certain.append(token)
        if certain:
            matcher.rollback(len(certain))  # looked ahead only: the choices consume them
        return certain

    def choose(self, token_ids: torch.Tensor, logits: torch.Tensor, draft: Optional[int] = None) -> int:
        """The next token, given every token so far and the next token's logits (1 × vocabulary).

        With ``draft`` (a guess of the next token, made without looking at these logits) the
        choice keeps the output's distribution: greedy choice is what it would be anyway, and
        sampling takes the guess with its probability, else samples from the other tokens
        (renormalized), the standard acceptance rule for a guess that was certain."""
        sampling = self.sampling
        scores = logits + self._bias if self._bias is not None else logits
        if self._chosen and (sampling.presence_penalty or sampling.frequency_penalty):
            ids = torch.tensor(list(self._chosen))
            counts = torch.tensor(list(self._chosen.values()), dtype=scores.dtype)
            scores = scores.clone()
            scores[0, ids] -= sampling.frequency_penalty * counts + sampling.presence_penalty
        if self._repetition is not None:
            scores = self._repetition(token_ids, scores)
        if self._constraint is not None:
            scores = scores.masked_fill(~self._allowed_tokens(scores.shape[-1]), float("-inf"))
        if sampling.greedy:
            token = int(scores.argmax(dim=-1)[0])
        else:
            scores = self._processors(token_ids, scores)
            probabilities = torch.softmax(scores, dim=-1)
            if sampling.min_p:
                probabilities = torch.where(probabilities < sampling.min_p * probabilities.max(), 0.0, probabilities)
            if draft is not None and (float(torch.rand(1, generator=self._generator))
                                      < float(probabilities[0, draft] / probabilities.sum())):
                token = draft
            else:
                if draft is not None:  # the guess was turned down: any token but it
                    probabilities = probabilities.clone()
                    probabilities[0, draft] = 0.0
                token = int(torch.multinomial(probabilities, num_samples=1, generator=self._generator)[0, 0])
        self._chosen[token] += 1
        if self._constraint is not None:
            self._constraint.matcher.consume_token(token)
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
