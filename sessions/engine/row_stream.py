"""Several samples of one prompt as rows of one Petals inference session (OpenAI's ``n``).

``RowsTokenStream`` feeds the prompt once per row at its first step (a batch of ``rows`` rows:
the swarm's servers keep an attention cache per row), then each row's last token: one trip
through the swarm serves every row. The output head and the token choice run on this machine,
per row, each row with its own ``TokenChooser`` (its own generator, seeded by ``row_seed``, and
its own constraint). A row that has finished is still fed its last token while the others go on,
and what the model computes for it is ignored. ``sessions.engine.rows`` runs a generation on it.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from sessions.engine.grammar import GrammarCompiler, constrained, shared_compiler
from sessions.engine.token_chooser import TokenChooser
from sessions.engine.token_stream import HeldSession
from sessions.errors import MaxLengthExceeded, SwarmCallFailed
from sessions.models import LoadedModel
from sessions.requests import ChosenTokenLogprobs, SamplingParams
from swarm.petals_api import InferenceSession, recording
from swarm.route_trace import RouteRecorder

# Seeds are what torch's generators take: 64 bits.
SEED_SPACE = 2 ** 64


def row_seed(seed: Optional[int], row: int) -> Optional[int]:
    """The seed of row ``row`` of a request seeded with ``seed``: ``seed + row``, past 2**64 - 1 wrapped
    around to 0 (None stays None: every row then samples from the process's generator). Row 0 has
    the request's own seed, so a request with ``n`` rows begins with the reply of the same request
    with one row, and row ``i`` is what a request of one row seeded ``row_seed(seed, i)`` writes."""
    if seed is None:
        return None
    derived = seed + row
    return derived - SEED_SPACE if derived >= SEED_SPACE else derived


class RowsTokenStream(HeldSession):
    """One inference session on the swarm holding ``rows`` rows, each its own sample of one prompt.

    Its methods block (the session runs them in its executor), but ``constraints``, awaited on the
    event loop before the first step. ``close`` releases the swarm's caches.
    """

    def __init__(self, loaded: LoadedModel, max_length: int, rows: int,
                 observe_server_step: Optional[Callable[[str, float], None]] = None,
                 grammars: Optional[GrammarCompiler] = None):
        self.loaded = loaded
        self.rows = rows
        self.max_length = max_length
        self._remote = loaded.client.transformer.h
        self._session = InferenceSession(self._remote.sequence_manager, max_length)
        self.token_ids = torch.empty((rows, 0), dtype=torch.int64)  # what each row fed through the swarm
        self._last: List[Optional[int]] = [None] * rows  # each row's last token chosen, fed at the next step
        self._grammars = grammars or shared_compiler()
        self.route = RouteRecorder(observe_server_step)  # the servers of each step

    @property
    def position(self) -> int:
        """How many tokens of each row the swarm holds attention caches for."""
        return self.token_ids.shape[1]

    async def choosers(self, sampling: SamplingParams) -> List[TokenChooser]:
        """Each row's token choices: ``sampling`` with the row's seed (``row_seed``) and, for a
        JSON schema or grammar, a constraint of its own (compiled once, then copied); refused as
        ``TokenStream.prepare`` refuses a constraint, or a logit bias outside the vocabulary."""
        choosers, tokenizer = [], self.loaded.tokenizer
        for row in range(self.rows):
            constraint = await self._grammars.compile(tokenizer, sampling) if constrained(sampling) else None
            choosers.append(TokenChooser(dataclasses.replace(sampling, seed=row_seed(sampling.seed, row)),
                                         tokenizer, self.loaded.client.config.vocab_size, constraint))
        return choosers

    def step(self, new_input_ids: Sequence[int],
             choosers: Sequence[Optional[TokenChooser]]) -> List[Optional[Tuple[int, Optional[ChosenTokenLogprobs]]]]:
        """Feeds each row's last token and then ``new_input_ids`` (the first step: the prompt, in
        every row) through the swarm; each row with a chooser chooses its next token, returned with
        its log-probabilities (when asked for); a row without one (finished) gets None."""
        feed = [([last] if last is not None else []) + list(new_input_ids) for last in self._last]
        if not feed[0]:
            raise ValueError("nothing to feed: give input ids to start a session")
        if self.position + len(feed[0]) > self.max_length:
            raise MaxLengthExceeded(f"Maximum length exceeded: {self.position} + {len(feed[0])} tokens per row "
                                    f"exceed the session's {self.max_length}")
        input_ids = torch.tensor(feed, dtype=torch.int64)
        client = self.loaded.client
        with torch.inference_mode(), self._remote.use_session(self._session), recording(self.route):
            try:
                hidden = client.transformer(input_ids=input_ids).last_hidden_state[:, -1:]
            except Exception as error:  # the swarm's failure, told apart from one of our own code
                raise SwarmCallFailed(error) from error
            logits = client.lm_head(hidden)[:, 0].float()
        self.token_ids = torch.cat([self.token_ids, input_ids], dim=1)
        chosen: List[Optional[Tuple[int, Optional[ChosenTokenLogprobs]]]] = []
        for row, chooser in enumerate(choosers):
            if chooser is None:
                chosen.append(None)
                continue
            token = chooser.choose(self.token_ids[row:row + 1], logits[row:row + 1])
            self._last[row] = token
            chosen.append((token, chooser.last_logprobs))
        return chosen
