"""How a generation picks tokens from logits: penalties, bias, min-p and seeds (pure logic)."""

import pytest
import torch

from sessions.engine.token_chooser import TokenChooser
from sessions.errors import InvalidRequest
from sessions.requests import SamplingParams

VOCAB = 4
NO_TOKENS = torch.empty((1, 0), dtype=torch.int64)


def logits(*values: float) -> torch.Tensor:
    return torch.tensor([values])


def choices(sampling: SamplingParams, steps: int, scores: torch.Tensor) -> list:
    chooser = TokenChooser(sampling, tokenizer=None, vocab_size=VOCAB)
    return [chooser.choose(NO_TOKENS, scores) for _ in range(steps)]


def test_presence_penalty_counts_a_token_once_and_frequency_per_use():
    scores = logits(0.0, 3.0, 2.0, 0.0)
    assert choices(SamplingParams(), 3, scores) == [1, 1, 1]
    # 3.0 - 1.5 < 2.0: the second choice moves on, and the third comes back to 1 (2.0 - 1.5 < 1.5).
    assert choices(SamplingParams(presence_penalty=1.5), 3, scores) == [1, 2, 1]
    # Frequency grows with each use: 3 - 0.6k against 2 - 0.6k' alternates once the gap closes.
    assert choices(SamplingParams(frequency_penalty=0.6), 4, scores) == [1, 1, 2, 1]


def test_logit_bias_and_its_vocabulary_check():
    assert choices(SamplingParams(logit_bias=((3, 5.0),)), 2, logits(0.0, 3.0, 2.0, 0.0)) == [3, 3]
    with pytest.raises(InvalidRequest, match="not in this model's vocabulary"):
        TokenChooser(SamplingParams(logit_bias=((VOCAB, 1.0),)), tokenizer=None, vocab_size=VOCAB)


def test_min_p_drops_unlikely_tokens_and_a_seed_repeats_a_sample():
    scores = logits(0.0, 5.0, 4.0, -5.0)  # token 3 is ~1e-4 of the likeliest
    sampled = choices(SamplingParams(do_sample=True, min_p=0.2, seed=1), 300, scores)
    assert set(sampled) == {1, 2}
    assert choices(SamplingParams(do_sample=True, seed=1), 50, scores) == \
        choices(SamplingParams(do_sample=True, seed=1), 50, scores)
