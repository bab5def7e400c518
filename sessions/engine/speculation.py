"""Drafts for speculative decoding: cheap guesses of the next tokens, for one step to verify.

A step that feeds a draft along with its pending token gets the model's logits at every
position in one trip through the swarm; the token stream then keeps the draft's tokens for as
long as the model chooses them too (``sessions.engine.token_chooser``), plus the model's own next
token, and the swarm rolls back the rest (``swarm.rollback``). A draft costs little when it is
wrong, and saves a trip for each token it gets right.

Drafts come from a constraint's grammar first: the tokens a JSON schema or grammar forces next
(a key's name, the punctuation between values) are drafted whole. Otherwise from prompt lookup:
the last few tokens are looked up in what the client predicted the output to be (OpenAI's
``prediction``) and in the conversation so far, and the tokens that followed them there are the
guess. The draft length adapts to how the last drafts fared: it doubles while they are taken
whole, shrinks to what was taken when one is cut short, and drafting pauses for a while (longer
each time) when drafts keep failing and do not pay for what they add to a step. On a route that
cannot roll back only tokens a constraint allows alone are drafted (``propose_forced``).
"""

import bisect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

# n-gram sizes looked up, longest first: a longer match is a better guess (and at the same
# length the prediction's).
PREDICTION_NGRAMS = (3, 2, 1)
CONTEXT_NGRAMS = (3, 2, 1)
FIRST_DRAFT_TOKENS = 4
# Drafts that got nothing right, in a row, before drafting pauses; the longest pause, in steps.
# A miss costs a step little (a draft of one token after a miss), a hit saves a whole trip.
MISSES_BEFORE_PAUSE = 4
LONGEST_PAUSE = 16

GRAMMAR = "grammar"
PREDICTION = "prediction"
PROMPT_LOOKUP = "prompt_lookup"
DRAFT_SOURCES = (GRAMMAR, PREDICTION, PROMPT_LOOKUP)


@dataclass(frozen=True)
class Draft:
    """Tokens guessed to come next, and where the guess came from."""

    tokens: Tuple[int, ...] = ()
    source: Optional[str] = None


class NgramIndex:
    """Where each short run of tokens (n-grams of the given sizes) ended in a token sequence that
    only grows, so that the tokens that followed it can be looked up."""

    def __init__(self, sizes: Sequence[int]):
        self.sizes = sizes
        self.tokens: List[int] = []
        self._ends: Dict[Tuple[int, ...], List[int]] = {}
        self._indexed = 0  # ends below this are indexed (an end needs a token after it)

    def extend_to(self, tokens: Sequence[int]) -> None:
        """Takes ``tokens``, which go on from the sequence so far, as the sequence: only the new
        tokens are indexed (a step's worth)."""
        known = len(self.tokens)
        if len(tokens) < known or (known and tokens[known - 1] != self.tokens[-1]):
            self.__init__(self.sizes)  # not a continuation (the conversation was cut): start over
            known = 0
        self.tokens.extend(tokens[known:])
        for end in range(max(self._indexed, 1), len(self.tokens)):
            for size in self.sizes:
                if end >= size:
                    self._ends.setdefault(tuple(self.tokens[end - size:end]), []).append(end)
        self._indexed = max(self._indexed, len(self.tokens))

    def follow(self, suffix: Sequence[int], length: int, after: Optional[int] = None,
               sizes: Optional[Sequence[int]] = None) -> Tuple[int, Tuple[int, ...]]:
        """Where the longest n-gram ending ``suffix`` (of ``sizes``, by default every indexed size)
        ended in the sequence, and up to ``length`` tokens that followed it there: its first place
        from ``after`` on when given (else its last place). ``(0, ())`` when none is found."""
        for size in sizes or self.sizes:
            if size not in self.sizes or len(suffix) < size:
                continue
            ends = self._ends.get(tuple(suffix[-size:]))
            if not ends:
                continue
            place = bisect.bisect_left(ends, after) if after is not None else len(ends)
            end = ends[place] if place < len(ends) else ends[-1]
            return end, tuple(self.tokens[end:end + length])
        return 0, ()


@dataclass
class DraftLength:
    """How many tokens to draft next, from how the last drafts fared and what they cost.

    Drafting pauses after a run of misses only while drafts do not pay: while the share of
    drafted tokens taken is below what one drafted token adds to a step's time, in steps (on a
    network, where a step is mostly its trips, a drafted token costs little; on one CPU it costs
    more). Until both times are known, they are taken to pay.
    """

    most: int
    length: int = 0
    _misses: int = 0
    _pause: int = 0
    _paused_for: int = 0
    _acceptance: Optional[float] = None  # moving average of the share of drafted tokens taken
    _step_seconds: Optional[float] = None  # moving average of a step without a draft (nor new input)
    _token_seconds: Optional[float] = None  # ... of what one drafted token adds to a step

    def __post_init__(self) -> None:
        self.length = min(FIRST_DRAFT_TOKENS, self.most)

    def next(self) -> int:
        """The length of the next draft (0 while drafting pauses)."""
        if self._paused_for > 0:
            self._paused_for -= 1
            return 0
        return self.length

    def observe(self, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` tokens had its first ``accepted`` taken."""
        self._acceptance = _moving_average(self._acceptance, accepted / drafted)
        if accepted == drafted:
            self.length, self._misses, self._pause = min(self.most, 2 * max(self.length, drafted)), 0, 0
        elif accepted:
            self.length, self._misses = max(1, accepted + 1), 0
        else:
            self.length, self._misses = 1, self._misses + 1
            if self._misses >= MISSES_BEFORE_PAUSE and not self.pays():
                self._pause = min(LONGEST_PAUSE, max(2, 2 * self._pause))
                self._paused_for, self._misses = self._pause, 0

    def observe_time(self, drafted: int, seconds: float) -> None:
        """A step that carried ``drafted`` draft tokens (and no new input) took ``seconds``."""
        if not drafted:
            self._step_seconds = _moving_average(self._step_seconds, seconds)
        elif self._step_seconds is not None:
            added = max(0.0, seconds - self._step_seconds) / drafted
            self._token_seconds = _moving_average(self._token_seconds, added)

    def pays(self) -> bool:
        """Whether drafts have been worth their cost lately (True until that is known)."""
        if self._acceptance is None or self._step_seconds is None or self._token_seconds is None:
            return True
        return self._acceptance > self._token_seconds / self._step_seconds


def _moving_average(average: Optional[float], value: float, weight: float = 0.25) -> float:
    return value if average is None else (1 - weight) * average + weight * value


@dataclass
class DraftCounts:
    """Tokens drafted and accepted, by draft source."""

    drafted: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(DRAFT_SOURCES, 0))
    accepted: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(DRAFT_SOURCES, 0))

    def add(self, source: str, drafted: int, accepted: int) -> None:
        self.drafted[source] += drafted
        self.accepted[source] += accepted


class Speculation(Protocol):
    """What a token stream asks of a generation's drafts, in the step's worker thread."""

    def propose(self, token_ids: Sequence[int], new_tokens: int, forced: Sequence[int] = ()) -> Draft:
        """A draft to follow ``token_ids`` (``forced``: the tokens a constraint forces next), or an
        empty one."""

    def propose_forced(self, forced: Sequence[int], new_tokens: int) -> Draft:
        """A draft of ``forced`` tokens only (within the room), or an empty one."""

    def observe(self, draft: Draft, accepted: int) -> None:
        """The step kept the first ``accepted`` tokens of ``draft``."""

    def observe_time(self, draft: Draft, seconds: float) -> None:
        """A step without new input, carrying ``draft`` (maybe empty), took ``seconds`` in the swarm."""


class GenerationSpeculation:
    """The drafts of one generation, within the room it leaves (``room(new_tokens)``: how many
    tokens its next step, feeding ``new_tokens`` of new input, may choose at most).

    ``propose`` and ``observe`` run in the step's worker thread, one step at a time; the counts
    are read by the generation between steps.
    """

    def __init__(self, most_tokens: int, room: Callable[[int], int], prediction_ids: Sequence[int] = ()):
        self._length = DraftLength(most_tokens)
        self._room = room
        self._prediction_ids = prediction_ids  # indexed at the first draft, in a step's worker thread
        self._prediction = NgramIndex(PREDICTION_NGRAMS)
        # Where the output has got to in the prediction, and in the conversation when it follows
        # a passage of it (a quote): a lookup there is likelier right than elsewhere.
        self._prediction_cursor = 0
        self._context_cursor: Optional[int] = None
        self._guessed_from = 0  # where the last draft began in its source
        self._context = NgramIndex(CONTEXT_NGRAMS)
        self.counts = DraftCounts()

    def propose(self, token_ids: Sequence[int], new_tokens: int, forced: Sequence[int] = ()) -> Draft:
        """A draft to follow ``token_ids`` (the conversation, the pending token and a step's new
        input last), or an empty one. ``forced``: the tokens a constraint forces next, drafted
        whole (up to the longest draft) since the model nearly always writes them so."""
        if forced:
            return self.propose_forced(forced, new_tokens)
        length = min(self._length.next(), self._room(new_tokens) - 1)
        if length <= 0:
            return Draft()
        if self._prediction_ids:
            self._prediction.extend_to(self._prediction_ids)
            self._prediction_ids = ()
        self._context.extend_to(token_ids)
        for size in PREDICTION_NGRAMS:  # the longest match wins; at the same length, the prediction
            end, guess = self._prediction.follow(token_ids, length, after=self._prediction_cursor, sizes=(size,))
            if guess:
                self._guessed_from = end
                return Draft(guess, PREDICTION)
            end, guess = self._context.follow(token_ids, length, after=self._context_cursor, sizes=(size,))
            if guess:
                self._guessed_from = end
                return Draft(guess, PROMPT_LOOKUP)
        return Draft()

    def propose_forced(self, forced: Sequence[int], new_tokens: int) -> Draft:
        """A draft of the tokens a constraint forces next, within the room and the longest draft."""
        length = min(self._room(new_tokens) - 1, self._length.most)
        return Draft(tuple(forced[:length]), GRAMMAR) if forced and length > 0 else Draft()

    def observe_time(self, draft: Draft, seconds: float) -> None:
        """A step without new input, carrying ``draft`` (maybe empty), took ``seconds`` in the swarm."""
        if draft.source != GRAMMAR:  # forced tokens are drafted whatever they cost
            self._length.observe_time(len(draft.tokens), seconds)

    def observe(self, draft: Draft, accepted: int) -> None:
        """The step kept the first ``accepted`` tokens of ``draft``."""
        if draft.source != GRAMMAR:  # forced tokens say nothing of how well lookups guess
            self._length.observe(len(draft.tokens), accepted)
        self.counts.add(draft.source, len(draft.tokens), accepted)
        if draft.source == PREDICTION:  # the output has got this far in the prediction
            self._prediction_cursor = self._guessed_from + accepted
        elif draft.source == PROMPT_LOOKUP:  # ... or in the passage of the conversation it follows
            self._context_cursor = self._guessed_from + accepted if accepted else None
