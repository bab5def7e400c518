"""Where a session's conversation stands, and the one rule that bounds its length.

``SessionPositions`` owns a session's positions: the tokens the swarm holds (its token
stream's position), the token chosen but not yet fed (the stream's pending one) and the token
carried from a stopped generation to the next. It is the only code that moves them: a step
advances them (by several tokens when it verified a draft), a generation that took fewer tokens
than its step chose gives the rest back, a client may cut the conversation back, a generation
carries a token or takes the carried one, new input after a carried token or a continuing
request discards the pending token, a stop token replaces it.
The length rule (``fits``) and the ``MaxLengthExceeded`` it raises are here too, so every
check counts the same tokens and words its refusal the same way.
"""

from typing import Any, List, Optional, Sequence

from sessions.engine.speculation import Speculation
from sessions.engine.steps import StepResult
from sessions.errors import InvalidRequest, MaxLengthExceeded
from sessions.requests import SamplingParams


class SessionPositions:
    """The positions of one session's token stream (``stream``, a ``TokenStream`` or a test's
    fake) and its carried token, within the session's ``max_length``.

    ``advance`` runs in a step's worker thread, and so does ``fits`` when a step asks whether the
    next one may start; everything else runs on the event loop, between steps.
    """

    def __init__(self, stream: Any, max_length: int):
        self._stream = stream
        self.max_length = max_length
        self._carried: Optional[StepResult] = None  # chosen ahead by a stopped generation, not yet sent

    @property
    def position(self) -> int:
        """How many tokens the swarm holds attention caches for."""
        return self._stream.position

    @property
    def pending(self) -> Optional[int]:
        """The token chosen last and not yet fed: the next step feeds it first."""
        return self._stream.pending

    def conversation(self) -> List[int]:
        """Every token of the session's conversation: those the swarm holds, then the pending one."""
        return list(self._stream.fed_token_ids()) + ([self.pending] if self.pending is not None else [])

    @property
    def carried(self) -> Optional[StepResult]:
        """The step result a stopped generation chose ahead and never sent (its token is the pending one)."""
        return self._carried

    def length_with(self, new_input_ids: list) -> int:
        """Tokens in the conversation once ``new_input_ids`` are added, the pending one included."""
        return self.position + (self.pending is not None) + len(new_input_ids)

    def fits(self, new_input_ids: list, request_max_length: Optional[int] = None) -> bool:
        """Whether a step feeding ``new_input_ids`` (after the pending token) fits: the session holds
        every token the step feeds; with a request's ``max_length``, the token the step chooses
        fits within it (and within the session's) as well."""
        length = self.length_with(new_input_ids)
        if request_max_length is None:
            return length <= self.max_length
        return length + 1 <= min(self.max_length, request_max_length)

    def room(self, new_tokens: int, request_max_length: Optional[int] = None) -> int:
        """How many tokens a step feeding ``new_tokens`` of new input (after the pending token) may
        choose, so that the conversation fits the session (and the request's ``max_length``)."""
        limit = min(self.max_length, request_max_length or self.max_length)
        return limit - (self.position + (self.pending is not None) + new_tokens)

    def check_step(self, new_input_ids: list) -> None:
        """Raises ``MaxLengthExceeded`` unless the session can hold a step feeding ``new_input_ids``."""
        if not self.fits(new_input_ids):
            raise self._exceeded(new_input_ids, f"exceeds pre-allocated maximum {self.max_length}")

    def check_input(self, new_input_ids: list, request_max_length: Optional[int]) -> None:
        """Raises ``MaxLengthExceeded`` unless a generation's input leaves room for a new token:
        the session must hold it, and new input must leave room within the request's ``max_length``
        (without new input, that limit ends the generation instead)."""
        if not self.fits(new_input_ids) or (new_input_ids and not self.fits(new_input_ids, request_max_length)):
            limit = min(self.max_length, request_max_length or self.max_length)
            raise self._exceeded(new_input_ids, f"leaves no room for a new token within the maximum {limit}")

    def _exceeded(self, new_input_ids: list, beyond: str) -> MaxLengthExceeded:
        # The one wording of a length refusal: what the swarm holds, what the step adds, which limit.
        return MaxLengthExceeded(f"Maximum length exceeded: prefix {self.position} + current "
                                 f"{self.length_with(new_input_ids) - self.position} {beyond}")

    def advance(self, new_input_ids: list, sampling: SamplingParams,
                speculation: Optional[Speculation] = None) -> Sequence[int]:
        """One step (in a worker thread): feeds the pending token and ``new_input_ids`` (and a
        draft of ``speculation``'s) through the swarm and returns the tokens chosen, the last
        one now pending."""
        return self._stream.step(new_input_ids, sampling, speculation)

    def give_back(self, count: int) -> None:
        """Forgets the last ``count`` tokens chosen (a step chose more than the generation took):
        the last token kept becomes the pending one again."""
        if count:
            self._stream.truncate(self.position + 1 - count)

    def check_truncation(self, length: int) -> None:
        """Raises ``InvalidRequest`` unless the conversation has ``length`` tokens to keep."""
        held = self.length_with([])
        if not 1 <= length <= held:
            raise InvalidRequest(f"from_position {length} is not within the session's conversation "
                                 f"(1 to {held} tokens)", param="from_position")

    def truncate(self, length: int) -> None:
        """Keeps the first ``length`` tokens of the conversation, the last one pending (the next
        generation continues after it); the carried token goes unless nothing changes."""
        if self.pending is None or length != self.length_with([]):
            self._carried = None
            self._stream.truncate(length)

    def carry(self, result: StepResult) -> None:
        """Keeps ``result``, chosen ahead by a generation that stopped and never sent, for the next one."""
        self._carried = result

    def take_carried(self, new_input_ids: list) -> Optional[StepResult]:
        """The carried result, taken by the generation that starts: its first token if the model just
        goes on; with ``new_input_ids`` it is dropped (the new input follows the token before it)."""
        carried, self._carried = self._carried, None
        if carried is not None and new_input_ids:
            self.discard_pending()
            return None
        return carried

    def replace_pending(self, token_id: int) -> None:
        """Feeds ``token_id`` instead of the pending token at the next step (e.g. a stop token)."""
        self._stream.replace_pending(token_id)

    def discard_pending(self) -> None:
        """Forgets the token chosen but not fed, carried or not: the next step feeds only new input."""
        self._stream.discard_pending()
        self._carried = None
