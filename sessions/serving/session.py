"""One client's chat session: a token stream in the swarm, its conversation state, its teardown."""

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, List, Optional

from sessions.accounts.limits import Account, Grant
from sessions.engine.decoding import IncrementalDecoder
from sessions.engine.executor import BlockingExecutor, TakingTurns
from sessions.engine.generation import run_generation
from sessions.engine.positions import SessionPositions
from sessions.engine.rows import run_rows
from sessions.engine.steps import RunAhead, StartedStep, StepResult, StepRunner
from sessions.errors import ServiceError, SessionExpired, StepTimeout, SwarmCallFailed, from_petals_error
from sessions.observe.logs import ConnectionLog, new_session_id
from sessions.observe.metrics import SessionMetrics
from sessions.requests import GenerationRequest, GenerationUpdate, SamplingParams
from sessions.serving.admission import Slot

logger = logging.getLogger(__name__)


# The longest each part of closing a session waits (the running generation, a step in flight,
# releasing the swarm session) before the session's place is given back regardless.
CLOSE_TIMEOUT = 30.0


class ChatSession:
    """A client's inference session and the text state of its conversation.

    Generations run one at a time, in the order their replies are first awaited; each takes a
    ticket when asked for, and ``cancel_generations`` ends every generation asked for so far (running
    or waiting) before its next step. ``aclose`` is the one way the session ends: it waits for a
    step in flight, releases the swarm's attention caches and gives back the session's admission
    slot. An error that leaves the session unusable closes it too.

    ``model`` is a ``LoadedModel`` and ``stream`` a ``TokenStream`` (tests pass fakes);
    steps run in ``executor``, tokenizing in ``tokenizer_pool``. ``positions`` owns where the
    stream stands and the token carried between generations: only it moves them. A step verifies
    drafts of up to ``draft_tokens`` tokens (0: none). A session of several ``rows`` (its stream a
    ``RowsTokenStream``) runs each generation as that many samples of one prompt (``run_rows``).
    """

    def __init__(self, connection_id: str, model: Any, stream: Any, max_length: int, executor: BlockingExecutor,
                 tokenizer_pool: TakingTurns, step_timeout: float, metrics: SessionMetrics, slot: Slot,
                 account: Account, on_closed: Callable[["ChatSession"], None] = lambda session: None,
                 close_timeout: float = CLOSE_TIMEOUT, draft_tokens: int = 0, rows: int = 1):
        self.session_id = new_session_id()
        self.connection_id = connection_id  # the connection it serves now (a resumed or warm session moves on)
        self.model = model
        self.stream = stream
        self.positions = SessionPositions(stream, max_length)
        self.close_timeout = close_timeout
        self.draft_tokens = draft_tokens
        self.rows = rows
        self.metrics = metrics
        self.log = ConnectionLog(logger, connection_id, self.session_id)
        self.decoder = IncrementalDecoder(model.tokenizer)
        self._steps = StepRunner(stream, self.positions, self.decoder, executor, step_timeout, owner=slot.client,
                                 model=model.spec.key)
        self._executor = executor
        self._tokenizer_pool = tokenizer_pool
        self._slot = slot
        self.account = account  # whose limits its generations spend
        self._grant: Optional[Grant] = None  # the running generation's
        self._on_closed = on_closed
        self._turn = asyncio.Lock()
        self._tickets_issued = 0
        self._tickets_finished = 0
        self._cancelled_through = 0  # generations with a ticket up to this one are cancelled
        self._closing: Optional["asyncio.Future[None]"] = None
        self.last_active = time.monotonic()
        self.closed_reason: Optional[str] = None

    @property
    def max_length(self) -> int:
        """The most tokens the session holds (its swarm servers allocated that many)."""
        return self.positions.max_length

    @property
    def client(self) -> str:
        """The client whose limits this session counts against."""
        return self._slot.client

    @property
    def unfinished_generations(self) -> int:
        """Generations running or waiting for their turn."""
        return self._tickets_issued - self._tickets_finished

    @property
    def has_generations(self) -> bool:
        """Whether a generation is running or waiting for its turn."""
        return self.unfinished_generations > 0

    @property
    def released(self) -> bool:
        """Whether the session's swarm resources are released."""
        return self._slot.released

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate]:
        """Queues a generation now (its place in line is taken at once); iterate for its replies.

        Raises ``SessionExpired`` (when iterated) once the session is closed; an error after
        which the session is unusable closes the session before it reaches the caller.
        """
        self._tickets_issued += 1
        return self._generate(request, self._tickets_issued)

    async def _generate(self, request: GenerationRequest, ticket: int) -> AsyncIterator[GenerationUpdate]:
        started, tokens = time.monotonic(), 0
        try:
            async with self._turn:
                self._check_open()
                # Closed before the turn is given back: a step it started ahead ends first.
                try:
                    run = run_rows if self.rows > 1 else run_generation
                    async with aclosing(run(self, request, ticket)) as updates:
                        async for update in updates:
                            tokens += update.token_count
                            yield update
                finally:
                    self._settle(tokens)
            self.log.info("Generated %d tokens in %.2f s", tokens, time.monotonic() - started)
        except Exception as error:
            if not (isinstance(error, ServiceError) and error.session_survives):
                await self.aclose(f"failed: {getattr(error, 'code', 'internal error')}")
            raise
        finally:
            self._tickets_finished += 1
            self.last_active = time.monotonic()

    def continue_for(self, connection_id: str, shared: int) -> int:
        """Takes the session, left by a finished request, for another request (``connection_id``)
        whose prompt shares its first ``shared`` tokens (all those the swarm holds, or fewer:
        the session goes back to them); returns ``shared``, the prompt tokens not fed again.
        The token chosen last was never fed: the new prompt says what follows."""
        self.positions.discard_pending()
        if shared < self.positions.position:  # the swarm goes back to the shared tokens at the next step
            self.positions.truncate(shared + 1)
            self.positions.discard_pending()
        self.last_active = time.monotonic()
        self.log.info("Continues as %s, %d tokens already in the swarm", connection_id, shared)
        self.serve(connection_id)
        return shared

    def serve(self, connection_id: str) -> None:
        """The session serves ``connection_id`` from now on (its log lines say so)."""
        self.connection_id = connection_id
        self.log = ConnectionLog(logger, connection_id, self.session_id)

    def cancel_generations(self) -> None:
        """Ends every generation requested so far, before its next step."""
        self._cancelled_through = self._tickets_issued

    def cancelled(self, ticket: int) -> bool:
        """Whether the generation holding ``ticket`` must end now."""
        return ticket <= self._cancelled_through or self.closed_reason is not None

    def grant_tokens(self, request: GenerationRequest, fed_tokens: int, wanted: int) -> Optional[int]:
        """Takes the running generation's leave from the account (its prompt: the tokens fed and
        those a warm session held); returns the most tokens it may write (None: unbounded)."""
        self._grant = self.account.grant(self.model.spec.key, fed_tokens + request.cached_tokens,
                                         request.cached_tokens, wanted)
        return self._grant.max_new_tokens

    def _settle(self, written: int) -> None:
        """Accounts the generation that ended, with the swarm servers that served it."""
        if self._grant is not None:
            grant, self._grant = self._grant, None
            grant.settle(written, {peer_id for peer_id, _, _ in self.stream.route.spans})

    def _check_open(self) -> None:
        if self.closed_reason is not None:
            raise SessionExpired(f"Session {self.session_id} expired ({self.closed_reason}); "
                                 "open a new inference session")

    def encode(self, text: str) -> "asyncio.Future[List[int]]":
        """Token ids of ``text`` (tokenized in the tokenizer pool)."""
        return self._tokenizer_pool.run(self.client, self.model.encode, text)

    def start_step(self, new_input_ids: list, sampling: SamplingParams,
                   run_ahead: Optional[RunAhead] = None) -> StartedStep:
        """Starts one step in the executor; ``finish_step`` waits for its result. When
        ``run_ahead`` allows, the step starts the one after it as soon as it is done.
        ``MaxLengthExceeded`` if the session cannot hold what it feeds."""
        self.positions.check_step(new_input_ids)
        return self._steps.start(new_input_ids, sampling, run_ahead)

    def start_call(self, input_tokens: int, function: Callable[..., Any], *args: Any) -> StartedStep:
        """Starts ``function(*args)`` in the executor as one step of the stream's own kind (a step of
        several rows), feeding ``input_tokens``; ``finish_step`` waits for what it returns."""
        return self._steps.start_call(input_tokens, function, *args)

    async def finish_step(self, step: StartedStep) -> StepResult:
        """The result of a started step, once it is done (``StepTimeout`` if it runs too long)."""
        model = self.model.spec.key
        try:
            result = await self._steps.result(step)
        except StepTimeout:
            self.metrics.observe_failed_step(model)
            raise
        except SwarmCallFailed as error:
            self.metrics.observe_failed_step(model)
            raise from_petals_error(error.__cause__, model) from error.__cause__
        except Exception:  # our own code failed: an internal error, its text kept from the client
            self.metrics.observe_failed_step(model)
            raise
        self.metrics.observe_step(model, time.monotonic() - step.started, step.input_tokens, len(result.tokens))
        # The reservation made at opening counted one span (of each row); a route through several holds more.
        self._slot.reserve(self.max_length * self.rows * self.model.state_bytes_per_token
                           * max(1, self.stream.span_count))
        return result

    async def aclose(self, reason: str) -> None:
        """Ends the session: stops its generations, waits for a step in flight, releases its caches.

        Safe to call more than once and from several tasks: every caller returns once it is done.
        """
        if self._closing is None:
            self.closed_reason = reason
            self.cancel_generations()
            self._closing = asyncio.ensure_future(self._release(reason))
        await asyncio.shield(self._closing)

    async def _release(self, reason: str) -> None:
        # Each wait is bounded: a hung swarm server must not keep the session's place forever.
        try:
            try:  # the running generation ends before its next step
                await asyncio.wait_for(self._turn.acquire(), self.close_timeout)
                self._turn.release()
            except asyncio.TimeoutError:
                pass
            # A step in flight (e.g. one that timed out) may have started the next before it ended.
            while (step := self._steps.in_flight) is not None and not step.done():
                done, _ = await asyncio.wait([asyncio.wrap_future(step)], timeout=self.close_timeout)
                if not done:
                    # Never two threads on one petals session: the stream closes once the step returns.
                    self.log.warning("A step still runs %.0f s after closing began; the swarm session is "
                                     "released when it returns", self.close_timeout)
                    step.add_done_callback(lambda _: self._executor.submit(self.stream.close))
                    return
            await asyncio.wait_for(self._executor.run(self.stream.close), self.close_timeout)
        except asyncio.TimeoutError:
            self.log.warning("Releasing the swarm session took over %.0f s; stopped waiting for it", self.close_timeout)
        except Exception:
            self.log.exception("Error while closing the inference session")
        finally:
            self._slot.release()
            self._on_closed(self)
            self.log.info("Closed the session (%s)", reason)
