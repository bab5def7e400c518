"""Token-by-token generation over one Petals inference session.

``TokenStream`` feeds tokens through the swarm one step at a time and picks the next token
on this machine (embeddings and the output head are local). Its methods block: the session
manager runs them in its executor.
"""

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import swarm.compat  # noqa: F401  (must precede petals)
from petals.client.inference_session import InferenceSession

from sessions.models import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: greedy by default, or sampled with the usual warpers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None

    def processors(self) -> LogitsProcessorList:
        """The transformers logits processors these parameters call for."""
        processors = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


class TokenStream:
    """One inference session on the swarm and the tokens that went through it.

    The last chosen token is not fed through the swarm until the next ``step``, which sends
    it together with any new input; so one step costs one round trip through the swarm.
    """

    def __init__(self, loaded: LoadedModel, max_length: int):
        self.loaded = loaded
        self._remote = loaded.client.transformer.h
        self._session = InferenceSession(self._remote.sequence_manager, max_length)
        self.token_ids = torch.empty((1, 0), dtype=torch.int64)  # every token, fed or pending
        self.pending: Optional[int] = None  # chosen but not yet fed through the swarm

    @property
    def position(self) -> int:
        """How many tokens the swarm holds attention caches for."""
        return self._session.position

    def step(self, new_input_ids: Sequence[int] = (), sampling: SamplingParams = SamplingParams()) -> int:
        """Feeds the pending token and ``new_input_ids`` through the swarm; returns the next token."""
        feed = ([self.pending] if self.pending is not None else []) + list(new_input_ids)
        if not feed:
            raise ValueError("nothing to feed: give input ids to start a session")
        input_ids = torch.tensor([feed], dtype=torch.int64)
        client = self.loaded.client
        with torch.inference_mode(), self._remote.use_session(self._session):
            hidden = client.transformer(input_ids=input_ids).last_hidden_state[:, -1:]
            logits = client.lm_head(hidden)[:, -1].float()
        self.token_ids = torch.cat([self.token_ids, torch.tensor([list(new_input_ids)], dtype=torch.int64)], dim=1)
        scores = sampling.processors()(self.token_ids, logits)
        if sampling.do_sample:
            next_token = int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0])
        else:
            next_token = int(scores.argmax(dim=-1)[0])
        self.pending = next_token
        self.token_ids = torch.cat([self.token_ids, torch.tensor([[next_token]])], dim=1)
        return next_token

    def replace_pending(self, token_id: int) -> None:
        """Feeds ``token_id`` instead of the pending token at the next step (e.g. a stop token)."""
        self.pending = token_id
        self.token_ids[0, -1] = token_id

    def close(self) -> None:
        """Releases the attention caches the swarm holds for this session."""
        self._session.close()
