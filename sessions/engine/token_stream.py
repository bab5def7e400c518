"""One Petals inference session driven token by token.

``TokenStream`` feeds tokens through the swarm one step at a time and picks the next token
on this machine (embeddings and the output head are local). A step may also verify a draft
(``sessions.engine.speculation``): the draft's tokens go through the swarm with the pending one, the
model's choice at each position is taken for as long as it agrees with the draft, and the
swarm forgets the rest, which needs every server on the route to roll back (``swarm.rollback``).
On a route that cannot, a draft holds only tokens a constraint allows alone, which are never
forgotten. Going back is lazy: the stream only lowers its position, and the next step starts there.

Its methods block: the session manager runs them in its executor; ``prepare``, awaited on the
event loop before a constrained generation's first step, compiles its constraint in the grammar
compiler's own threads.
"""

import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from sessions.engine.grammar import Constraint, GrammarCompiler, constrained, shared_compiler
from sessions.engine.speculation import Draft, Speculation
from sessions.engine.token_chooser import TokenChooser
from sessions.errors import SwarmCallFailed
from sessions.models import LoadedModel
from sessions.requests import ChosenTokenLogprobs, SamplingParams
from swarm.petals_api import InferenceSession, recording, route_rollback
from swarm.route_trace import RouteRecorder


class HeldSession:
    """What a token stream tells of the petals inference session it holds (``_session``), and its release."""

    _session: InferenceSession

    @property
    def span_count(self) -> int:
        """How many server spans the session's route has (0 before its first step)."""
        return len(self._session._server_sessions)

    @property
    def state_bytes(self) -> int:
        """Memory petals holds on this machine for the session: each span's history of inputs,
        kept to replay them on a replacement server if that span's server fails."""
        held = 0
        for span in list(self._session._server_sessions):  # read while a step may run
            history = span.history
            if history is not None:
                held += history.numel() * history.element_size()
        return held

    def close(self) -> None:
        """Releases the attention caches the swarm holds for this session."""
        self._session.close()


class TokenStream(HeldSession):
    """One inference session on the swarm and the tokens that went through it.

    The last chosen token is not fed through the swarm until the next ``step``, which sends
    it together with any new input; so one step costs one round trip through the swarm. In a
    chat session only its ``SessionPositions`` calls the methods that move the stream.
    """

    def __init__(self, loaded: LoadedModel, max_length: int,
                 observe_server_step: Optional[Callable[[str, float], None]] = None,
                 grammars: Optional[GrammarCompiler] = None):
        self.loaded = loaded
        self._remote = loaded.client.transformer.h
        self._session = InferenceSession(self._remote.sequence_manager, max_length)
        self.token_ids = torch.empty((1, 0), dtype=torch.int64)  # every token, fed or pending
        self.pending: Optional[int] = None  # chosen but not yet fed through the swarm
        self._fed = 0  # tokens the swarm's caches hold and the next step builds on (the swarm may hold more)
        self.last_logprobs: List[Optional[ChosenTokenLogprobs]] = []  # of the last step's choices
        self._chooser: Optional[TokenChooser] = None  # the running generation's, kept across its steps
        self._grammars = grammars or shared_compiler()
        self._prepared: Optional[Tuple[SamplingParams, Constraint]] = None  # for the next generation's steps
        self.route = RouteRecorder(observe_server_step)  # the servers of each step, per generation

    @property
    def position(self) -> int:
        """How many tokens the swarm holds attention caches for (that the next step builds on)."""
        return self._fed

    def fed_token_ids(self) -> list:
        """The tokens the swarm holds attention caches for, in order."""
        return self.token_ids[0, :self.position].tolist()

    def rolls_back(self) -> bool:
        """Whether the session may go back cheaply: every server on its route rolls back in
        place. Blocking: it may ask a server (once per server and process)."""
        return bool(self._session._server_sessions) and route_rollback.route_rolls_back(self._session)

    async def prepare(self, sampling: SamplingParams) -> None:
        """Compiles the constraint of ``sampling`` (a JSON schema or a grammar) for the steps of the
        generation that passes it; nothing to do for free text. ``InvalidRequest`` naming the
        request field when the constraint is refused, ``ServerBusy`` when too many compiles wait."""
        if constrained(sampling):
            self._prepared = (sampling, await self._grammars.compile(self.loaded.tokenizer, sampling))

    def step(self, new_input_ids: Sequence[int] = (), sampling: SamplingParams = SamplingParams(),
             speculation: Optional[Speculation] = None) -> List[int]:
        """Feeds the pending token and ``new_input_ids`` through the swarm, with a draft from
        ``speculation`` when the route can take it back; returns the tokens chosen: the draft's
        tokens the model chose too, then the model's own next token (now the pending one)."""
        feed = ([self.pending] if self.pending is not None else []) + list(new_input_ids)
        if not feed:
            raise ValueError("nothing to feed: give input ids to start a session")
        chooser = self._chooser_for(sampling)  # before any swarm work: it checks the request
        if self._session.position > self._fed:  # the stream went back since the swarm's last step
            route_rollback.roll_back(self._session, self._fed)
        draft = Draft()
        if speculation is not None and self.pending is not None:
            # The constraint has seen the generation's tokens so far: what it forces comes next.
            if self.rolls_back():
                draft = speculation.propose(self.token_ids[0].tolist() + list(new_input_ids), len(new_input_ids),
                                            chooser.forced_tokens())
            else:  # only tokens that are certain: the swarm will never have to forget them
                draft = speculation.propose_forced(chooser.forced_tokens(certain_only=True), len(new_input_ids))
        input_ids = torch.tensor([feed + list(draft.tokens)], dtype=torch.int64)
        client = self.loaded.client
        with torch.inference_mode(), self._remote.use_session(self._session), recording(self.route):
            started = time.perf_counter()
            try:
                hidden = client.transformer(input_ids=input_ids).last_hidden_state[:, -1 - len(draft.tokens):]
            except Exception as error:  # the swarm's failure, told apart from one of our own code
                raise SwarmCallFailed(error) from error
            if speculation is not None and not new_input_ids:  # what a draft token costs, as it goes
                speculation.observe_time(draft, time.perf_counter() - started)
            logits = client.lm_head(hidden)[0].float()
        self.token_ids = torch.cat([self.token_ids, torch.tensor([list(new_input_ids)], dtype=torch.int64)], dim=1)
        chosen, self.last_logprobs = [], []
        for position, guess in enumerate((*draft.tokens, None)):
            token = chooser.choose(self.token_ids, logits[position:position + 1], draft=guess)
            chosen.append(token)
            self.last_logprobs.append(chooser.last_logprobs)
            self.token_ids = torch.cat([self.token_ids, torch.tensor([[token]])], dim=1)
            if token != guess:
                break
        if draft.tokens:
            speculation.observe(draft, len(chosen) - 1)
        # The swarm holds the pending token, the new input and the draft; the draft's tokens
        # after the last one taken are forgotten at the next step.
        self._fed += len(feed) + len(chosen) - 1
        self.pending = chosen[-1]
        return chosen

    def _chooser_for(self, sampling: SamplingParams) -> TokenChooser:
        # One generation passes the same SamplingParams to each of its steps; a new one starts afresh.
        if self._chooser is None or self._chooser.sampling is not sampling:
            constraint = None
            if constrained(sampling):
                if self._prepared is None or self._prepared[0] is not sampling:
                    raise ValueError("a constrained generation's steps need prepare() first")
                (_, constraint), self._prepared = self._prepared, None  # its matcher follows this generation
            self._chooser = TokenChooser(sampling, self.loaded.tokenizer, self.loaded.client.config.vocab_size,
                                         constraint)
        return self._chooser

    def discard_pending(self) -> None:
        """Forgets the pending token (chosen ahead of need): the next step feeds only new input."""
        if self.pending is not None:
            self.pending = None
            self.token_ids = self.token_ids[:, :-1]

    def replace_pending(self, token_id: int) -> None:
        """Feeds ``token_id`` instead of the pending token at the next step (e.g. a stop token)."""
        self.pending = token_id
        self.token_ids[0, -1] = token_id

    def truncate(self, length: int) -> None:
        """Keeps the first ``length`` tokens of the conversation; the last one kept becomes the
        pending one, so the next step chooses what follows it. The swarm goes back at that step."""
        if not 1 <= length <= self.token_ids.shape[1]:
            raise ValueError(f"cannot keep {length} of {self.token_ids.shape[1]} tokens")
        self.token_ids = self.token_ids[:, :length]
        self.pending = int(self.token_ids[0, -1])
        self._fed = length - 1
