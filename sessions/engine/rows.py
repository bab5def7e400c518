"""The generation loop of several samples of one prompt, the rows of one session (OpenAI's ``n``).

Each step feeds every row through the swarm at once (``sessions.engine.row_stream``); each row
has its own decoder, stop strings, finish reason and log-probabilities, and the generation ends
when every row has. No drafts, no step runs ahead and no token is carried: a session of rows
serves one request and is closed after it, so none of that would pay (and the single-row loop,
``sessions.engine.generation``, stays as it is).
"""

from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Protocol, Sequence, Tuple

from sessions.engine.decoding import IncrementalDecoder
from sessions.engine.steps import ChosenToken, StartedStep
from sessions.engine.stops import StopStringFilter
from sessions.engine.token_chooser import TokenChooser
from sessions.errors import InvalidRequest, MaxLengthExceeded
from sessions.requests import GenerationRequest, GenerationUpdate


class RowsSession(Protocol):
    """What a generation of rows needs of the session it runs in (a ``ChatSession`` of several rows)."""

    model: Any  # a ``LoadedModel``: its tokenizer and end of sequence
    stream: Any  # a ``RowsTokenStream``
    max_length: int

    def cancelled(self, ticket: int) -> bool:
        """Whether the generation holding ``ticket`` must end now."""

    def grant_tokens(self, request: GenerationRequest, fed_tokens: int, wanted: int) -> Optional[int]:
        """Lets the generation feed ``fed_tokens`` of prompt and write up to ``wanted`` tokens (every
        row's): the most it may write (None: unbounded), or raises when its client may write none."""

    def start_call(self, input_tokens: int, function: Callable[..., Any], *args: Any) -> StartedStep:
        """Starts ``function(*args)`` as one step in the executor."""

    async def finish_step(self, step: StartedStep) -> Any:
        """What a started step returned, once it is done."""


@dataclass(frozen=True)
class RowsStepResult:
    """What one step of several rows chose: each row's token, None for the rows already finished."""

    chosen: Tuple[Optional[ChosenToken], ...]

    @property
    def tokens(self) -> Tuple[ChosenToken, ...]:
        """The tokens the step chose, of the rows still going."""
        return tuple(token for token in self.chosen if token is not None)


class _Row:
    """One row's own generation: its choices, its text and stops, what it wrote, why it ended."""

    def __init__(self, index: int, chooser: TokenChooser, tokenizer, request: GenerationRequest):
        self.index = index
        self.chooser = chooser
        self.decoder = IncrementalDecoder(tokenizer)
        self.decoder.add_context(request.input_ids[-1:])
        self.stops = StopStringFilter(request.stop_sequences)
        self.written = 0
        self.finish_reason: Optional[str] = None

    @property
    def going(self) -> bool:
        return self.finish_reason is None


def _step(stream: Any, new_input_ids: Sequence[int], rows: Sequence[_Row]) -> RowsStepResult:
    """One step of every row (in a worker thread), each chosen token turned into text by its row's decoder."""
    chosen = stream.step(new_input_ids, [row.chooser if row.going else None for row in rows])
    return RowsStepResult(tuple(
        None if choice is None else ChosenToken(choice[0], row.decoder.push([choice[0]]), choice[1])
        for row, choice in zip(rows, chosen)))


async def run_rows(session: RowsSession, request: GenerationRequest, ticket: int) -> AsyncIterator[GenerationUpdate]:
    """Runs one generation of ``request.choices`` rows in ``session`` (a ``ChatSession`` on a
    ``RowsTokenStream``): for each step, one update per row still going (its ``row``), each row's
    last with its ``finish_reason``. The rows share the tokens their client may spend."""
    stream = session.stream
    if session.cancelled(ticket):
        for index in range(stream.rows):
            yield GenerationUpdate(outputs="", last=True, token_count=0, finish_reason="cancelled", row=index)
        return
    if not request.input_ids:
        raise InvalidRequest("inputs must not be empty")
    input_ids = list(request.input_ids)
    limit = min(session.max_length, request.max_length or session.max_length)
    room = limit - len(input_ids)  # tokens each row may write
    if room < 1:
        raise MaxLengthExceeded(f"Maximum length exceeded: the prompt's {len(input_ids)} tokens leave no room for a "
                                f"new token within {limit}")
    rows = [_Row(index, chooser, session.model.tokenizer, request)
            for index, chooser in enumerate(await stream.choosers(request.sampling))]
    allowance = session.grant_tokens(request, len(input_ids), room * len(rows))  # the last check
    stream.route.reset()
    eos_token_id = session.model.eos_token_id
    written = 0  # by every row
    new_input_ids = input_ids
    while any(row.going for row in rows):
        if session.cancelled(ticket):
            for row in rows:
                if row.going:
                    row.finish_reason = "cancelled"
                    yield GenerationUpdate(outputs="", last=True, token_count=0, finish_reason="cancelled",
                                           text=row.stops.flush(), row=row.index)
            return
        step = session.start_call(len(new_input_ids) * len(rows), _step, stream, new_input_ids, rows)
        result = await session.finish_step(step)
        new_input_ids = []
        for row, token in zip(rows, result.chosen):
            if token is None:
                continue
            if allowance is not None and written >= allowance:  # the client's budget is spent: no more tokens
                row.finish_reason = "length"
                yield _update(session, request, row, None)
                continue
            row.written += 1
            written += 1
            visible = row.stops.push(token.text)
            if row.stops.matched or token.token == eos_token_id:
                row.finish_reason = "stop"
            elif row.written >= room:
                row.finish_reason = "length"
            yield _update(session, request, row, token, visible)
        if allowance is not None and written >= allowance:  # spent: the rows still going end without another step
            for row in rows:
                if row.going:
                    row.finish_reason = "length"
                    yield _update(session, request, row, None)


def _update(session: RowsSession, request: GenerationRequest, row: "_Row", token: Optional[ChosenToken],
            visible: str = "") -> GenerationUpdate:
    """The update of ``row`` after one step: ``token``'s text (none: the row ended without one), the
    text it makes safe to show, and the row's end if it ended."""
    last = row.finish_reason is not None
    return GenerationUpdate(
        outputs=token.text if token is not None else "", last=last, token_count=int(token is not None),
        finish_reason=row.finish_reason, text=visible + (row.stops.flush() if last else ""),
        stop_sequence=row.stops.matched_stop,
        logprobs=(token.logprobs,) if token is not None and token.logprobs is not None else (),
        route=session.stream.route.summary() if last and request.trace_route else None, row=row.index)
