"""The generation loop: one ``generate`` request run step by step in a chat session.

It feeds the new input, steps the session's token stream one token at a time, turns tokens
into text, watches for stop sequences, end of sequence and length limits, and yields the
replies the request asked for (one per ``max_new_tokens`` tokens, or one per chunk until a
stop when streaming). A constrained generation's JSON schema or grammar is compiled first, off
the step executor, so that no step waits on it. A step starts the next one itself, in its
worker thread, when the generation surely goes on (``GenerationRunAhead``): turning a token
into a reply and a frame never delays the swarm. A step may verify a draft
(``sessions.engine.speculation``) and bring several tokens: they go out at once, in as many replies as
they fill, and those past the generation's end are given back (the conversation ends where it
would have). If the generation is stopped while steps run ahead, a token one of them fed goes
out with the last reply, and the last one chosen (never fed) is kept unsent: it opens the next
generation if the model just goes on, and is dropped if new input comes (the session's
``SessionPositions`` keeps it, and checks every length).
"""

import asyncio
import collections
from typing import Any, AsyncIterator, Deque, List, Optional, Protocol, Sequence

from sessions.engine.decoding import IncrementalDecoder
from sessions.engine.grammar import constrained
from sessions.engine.positions import SessionPositions
from sessions.engine.speculation import PREDICTION, GenerationSpeculation
from sessions.engine.steps import ChosenToken, RunAhead, StartedStep, StepResult
from sessions.engine.stops import StopStringFilter
from sessions.errors import InvalidRequest
from sessions.request_rules import check_text_length
from sessions.requests import GenerationRequest, GenerationUpdate, PredictionTokens, SamplingParams


class GeneratingSession(Protocol):
    """What a generation needs of the session it runs in (a ``ChatSession``)."""

    model: Any  # a ``LoadedModel``: its end of sequence, its longest token in characters
    stream: Any  # a ``TokenStream``: its constraint compiler and route recorder
    decoder: IncrementalDecoder
    positions: SessionPositions
    metrics: Any  # a ``SessionMetrics``: drafts are counted there
    draft_tokens: int  # the longest draft a step verifies (0: no speculation)

    def cancelled(self, ticket: int) -> bool:
        """Whether the generation holding ``ticket`` must end now."""

    def encode(self, text: str) -> "asyncio.Future[List[int]]":
        """Token ids of ``text``."""

    def grant_tokens(self, request: GenerationRequest, fed_tokens: int, wanted: int) -> Optional[int]:
        """Lets the generation feed ``fed_tokens`` of prompt and write up to ``wanted`` tokens:
        returns the most it may write (None: no budget bounds it), or raises when its client's
        limits allow none."""

    def start_step(self, new_input_ids: list, sampling: SamplingParams,
                   run_ahead: Optional[RunAhead] = None) -> StartedStep:
        """Starts one step; ``MaxLengthExceeded`` if the session cannot hold what it feeds."""

    async def finish_step(self, step: StartedStep) -> StepResult:
        """The result of a started step, once it is done."""


async def run_generation(session: GeneratingSession, request: GenerationRequest,
                         ticket: int) -> AsyncIterator[GenerationUpdate]:
    """Runs one generation in ``session`` (whose turn it is); the last reply has ``stop=True``."""
    if session.cancelled(ticket):
        yield GenerationUpdate(outputs="", last=True, token_count=0, finish_reason="cancelled")
        return
    if constrained(request.sampling):  # refused, it leaves the session as it was
        await session.stream.prepare(request.sampling)
    stop_token_id = await _stop_token_id(session, request)
    positions = session.positions
    if request.input_ids is not None:
        input_ids = list(request.input_ids)
    elif request.inputs:
        check_text_length(request.inputs, positions.max_length, session.model.max_token_chars)
        input_ids = await session.encode(request.inputs)
    else:
        input_ids = []
    if request.from_position is not None:  # checked before anything moves
        positions.check_truncation(request.from_position)
        positions.truncate(request.from_position)
        session.decoder.add_context([positions.pending])
    # A token a stopped generation chose ahead of need, never sent: the next token if the model
    # just goes on, but new input follows the token before it.
    carried = positions.take_carried(input_ids)
    if not input_ids and positions.pending is None:
        raise InvalidRequest("inputs are required to start a session")
    # Refused before anything is fed: the session and its decoder stay as they were.
    positions.check_input(input_ids, request.max_length)
    speculative = request.speculative and session.draft_tokens > 0
    prediction_ids = await _prediction_ids(session, request) if speculative else []
    room = positions.room(len(input_ids), request.max_length) + 1  # the last token chosen is never fed
    wanted = room if request.streaming or request.max_new_tokens is None else min(request.max_new_tokens, room)
    try:  # the last check: from here on the prompt is fed
        allowance = session.grant_tokens(request, len(input_ids), wanted)
    except Exception:
        if carried is not None:
            positions.carry(carried)
        raise
    stops = StopStringFilter(request.stop_sequences)
    run_ahead = GenerationRunAhead(session, request, ticket, carried, allowance)
    speculation = None
    if speculative:
        speculation = run_ahead.speculation = GenerationSpeculation(session.draft_tokens, run_ahead.room,
                                                                    prediction_ids)
    session.stream.route.reset()
    eos_token_id = session.model.eos_token_id
    session.decoder.add_context(input_ids)
    ahead: Optional[StartedStep] = None  # the next step, started by the one before it
    ready: Deque[ChosenToken] = collections.deque(carried.tokens if carried is not None else ())
    written = 0  # tokens of the earlier replies
    try:
        while True:
            chunk, finish_reason = _Chunk(request.sampling.logprobs is not None), None
            while request.max_new_tokens is None or chunk.tokens < request.max_new_tokens:
                if allowance is not None and written + chunk.tokens >= allowance:
                    finish_reason = "length"  # the client's token budget is spent
                    break
                if not ready:  # the tokens of a step that are verified go out whatever happens next
                    if session.cancelled(ticket):
                        finish_reason = "cancelled"
                        if ahead is not None:
                            positions.carry(await _settle_steps_ahead(run_ahead, ahead, chunk))
                            ahead = None
                        break
                    if ahead is None:
                        if request.max_length is not None and not positions.fits(input_ids, request.max_length):
                            finish_reason = "length"  # the client's max_length is reached
                            break
                        ahead = session.start_step(input_ids, request.sampling, run_ahead)
                    step, ahead = ahead, None  # a step that fails is not waited for again
                    result = await run_ahead.take(step)
                    ahead = result.next_step
                    ready.extend(result.tokens)
                    input_ids = []
                token = ready.popleft()
                chunk.add(token)
                if token.token == eos_token_id:
                    finish_reason = "stop"
                    break
            visible = stops.push(chunk.text)
            if stops.matched and finish_reason != "cancelled":
                finish_reason = "stop"
            elif finish_reason is None and not request.streaming:
                finish_reason = "length"  # the one reply has its max_new_tokens
            if finish_reason is not None:
                visible += stops.flush()
                if ready:  # the step chose more than the generation takes: the conversation ends here
                    positions.give_back(len(ready))
                    session.decoder.add_context([positions.pending])
                    ready.clear()
                if stops.matched and stop_token_id is not None and stops.matched_stop != request.stop_sequence:
                    # The next turn must follow the stop token, as if the model had written it.
                    positions.replace_pending(stop_token_id)
                if speculation is not None:
                    session.metrics.observe_drafts(session.model.spec.key, speculation.counts)
            yield GenerationUpdate(outputs=chunk.text, last=finish_reason is not None, token_count=chunk.tokens,
                                   finish_reason=finish_reason, text=visible, stop_sequence=stops.matched_stop,
                                   logprobs=tuple(chunk.logprobs),
                                   route=(session.stream.route.summary() if finish_reason and request.trace_route
                                          else None),
                                   prediction_tokens=(_prediction_tokens(speculation) if finish_reason else None),
                                   session_length=(positions.length_with([]) if finish_reason else None))
            if finish_reason is not None:
                return
            written += chunk.tokens
    finally:
        if ahead is not None:  # the generation was left early: its steps end before its turn does
            run_ahead.halt()
            positions.carry(await _settle_steps_ahead(run_ahead, ahead, _Chunk(False)))
        elif ready:  # left early with tokens verified but not taken: the conversation ends before them
            positions.give_back(len(ready))


class _Chunk:
    """The tokens of one reply as they come: their count, text and log-probabilities."""

    def __init__(self, with_logprobs: bool):
        self.tokens, self.text, self.logprobs = 0, "", []
        self._with_logprobs = with_logprobs

    def add(self, token: ChosenToken) -> None:
        self.tokens += 1
        self.text += token.text
        if self._with_logprobs and token.logprobs is not None:
            self.logprobs.append(token.logprobs)


async def _settle_steps_ahead(run_ahead: "GenerationRunAhead", ahead: StartedStep, chunk: _Chunk) -> StepResult:
    """Waits for the steps a stopped generation started ahead. The tokens they fed are sent with
    the last reply (the conversation holds them); the last one chosen, never fed, is returned to
    be carried."""
    result = await run_ahead.take(ahead)
    while True:
        for token in result.tokens[:-1]:
            chunk.add(token)
        if result.next_step is None:
            return StepResult((result.last,))
        chunk.add(result.last)
        result = await run_ahead.take(result.next_step)


async def _prediction_ids(session: GeneratingSession, request: GenerationRequest) -> List[int]:
    """The request's ``prediction`` tokenized (bounded like any input first); none without one."""
    if not request.prediction:
        return []
    check_text_length(request.prediction, session.positions.max_length, session.model.max_token_chars)
    return await session.encode(request.prediction)


def _prediction_tokens(speculation: Optional[GenerationSpeculation]) -> Optional[PredictionTokens]:
    if speculation is None:
        return None
    counts = speculation.counts
    return PredictionTokens(accepted=counts.accepted[PREDICTION],
                            rejected=counts.drafted[PREDICTION] - counts.accepted[PREDICTION])


class GenerationRunAhead:
    """Lets a step start the next one from its worker thread when the generation surely goes on.

    It says no wherever the generation might end after the token: end of sequence, a stop
    asked for, the last token of a reply that is not streamed, a stop string completed (watched
    here on the same text the generation cuts), no room left. And it keeps the steps at most one
    ahead of the generation's own pace: a step starts no other while the generation has yet to
    take the result of the step before it, so a slow reader slows the generation as before and
    a stop finds at most two steps beyond the last token the generation took.
    """

    def __init__(self, session: GeneratingSession, request: GenerationRequest, ticket: int,
                 carried: Optional[StepResult], allowance: Optional[int] = None):
        self.speculation: Optional[GenerationSpeculation] = None  # the generation's drafts, if any
        self._session = session
        self._request = request
        self._ticket = ticket
        self._eos_token_id = session.model.eos_token_id
        self._stop_lookout = StopStringFilter(request.stop_sequences)
        # Tokens a reply that is not streamed still needs, within what the client may still spend.
        wanted = [limit for limit in (None if request.streaming else request.max_new_tokens, allowance)
                  if limit is not None]
        self._tokens_left = min(wanted) if wanted else None
        self._steps_done = 0  # counted in the worker threads
        self._steps_taken = 0  # counted by the generation
        self._halted = False
        if carried is not None:  # the generation's first token, chosen by the one before
            self._count(carried.tokens)

    def _count(self, tokens: Sequence[ChosenToken]) -> None:
        if self._tokens_left is not None:
            self._tokens_left -= len(tokens)
        self._stop_lookout.push("".join(token.text for token in tokens))

    async def take(self, step: StartedStep) -> StepResult:
        """The result of ``step``, counted as taken by the generation."""
        result = await self._session.finish_step(step)
        self._steps_taken += 1
        return result

    def room(self, new_tokens: int) -> int:
        """How many tokens the next step (feeding ``new_tokens`` of new input) may choose: within
        the session, the request's ``max_length``, the tokens a reply that is not streamed still
        needs and those its client may still spend (counted from the steps done so far, in the
        worker thread)."""
        room = self._session.positions.room(new_tokens, self._request.max_length)
        return room if self._tokens_left is None else min(room, self._tokens_left)

    def halt(self) -> None:
        """No step starts another from now on (the generation ends without a stop asked for)."""
        self._halted = True

    def allows(self, tokens: Sequence[ChosenToken]) -> bool:
        """Whether the generation surely goes on after ``tokens``."""
        self._count(tokens)
        self._steps_done += 1
        return (not self._halted and self._steps_done - self._steps_taken <= 1
                and all(token.token != self._eos_token_id for token in tokens)
                and not self._session.cancelled(self._ticket)
                and (self._tokens_left is None or self._tokens_left > 0) and not self._stop_lookout.matched
                and self._session.positions.fits([], self._request.max_length))


async def _stop_token_id(session: GeneratingSession, request: GenerationRequest) -> Optional[int]:
    """The single token of ``stop_sequence``, required when extra stop sequences are given."""
    if not request.extra_stop_sequences or request.stop_sequence is None:
        return None
    ids = await session.encode(request.stop_sequence)
    if len(ids) != 1:
        raise InvalidRequest("extra_stop_sequences need a stop_sequence that is exactly one token "
                             f"({request.stop_sequence!r} is {len(ids)} tokens)")
    return ids[0]
