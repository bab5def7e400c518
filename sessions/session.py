"""One client's chat session: a token stream in the swarm, its conversation state, its teardown."""

import asyncio
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, List, Optional, Protocol

from sessions.admission import Slot
from sessions.decoding import IncrementalDecoder
from sessions.errors import MaxLengthExceeded, ServiceError, SessionExpired, StepTimeout, from_petals_error
from sessions.executor import BlockingExecutor
from sessions.generation import run_generation
from sessions.logs import ConnectionLog
from sessions.metrics import SessionMetrics
from sessions.requests import ChosenTokenLogprobs, GenerationRequest, GenerationUpdate, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartedStep:
    """A step running in the executor: its future, when it was started, how many inputs it feeds."""

    future: Future
    started: float
    input_tokens: int


@dataclass(frozen=True)
class StepResult:
    """What one step chose: the token, the text it adds, its log-probabilities when asked for,
    and the next step when the worker started it at once (see ``RunAhead``)."""

    token: int
    text: str
    logprobs: Optional[ChosenTokenLogprobs] = None
    next_step: Optional[StartedStep] = None


class RunAhead(Protocol):
    """Decides, in the worker thread that just ran a step, whether the next one starts at once."""

    def allows(self, token: int, text: str) -> bool:
        """Whether the generation surely goes on after ``token`` (which adds ``text``)."""


# The longest each part of closing a session waits (the running generation, a step in flight,
# releasing the swarm session) before the session's place is given back regardless.
CLOSE_TIMEOUT = 30.0


class ChatSession:
    """A client's inference session and the text state of its conversation.

    Generations run one at a time, in the order their replies are first awaited; each takes a
    ticket when asked for, and ``request_stop`` ends every generation asked for so far (running
    or waiting) before its next step. ``aclose`` is the one way the session ends: it waits for a
    step in flight, releases the swarm's attention caches and gives back the session's admission
    slot. An error that leaves the session unusable closes it too.

    ``model`` is a ``LoadedModel`` and ``stream`` a ``TokenStream`` (tests pass fakes);
    blocking calls run in ``executor``.
    """

    def __init__(self, session_id: str, model: Any, stream: Any, max_length: int, executor: BlockingExecutor,
                 step_timeout: float, metrics: SessionMetrics, slot: Slot,
                 on_closed: Callable[["ChatSession"], None] = lambda session: None,
                 close_timeout: float = CLOSE_TIMEOUT):
        self.session_id = session_id
        self.model = model
        self.stream = stream
        self.max_length = max_length
        self.step_timeout = step_timeout
        self.close_timeout = close_timeout
        self.metrics = metrics
        self.log = ConnectionLog(logger, session_id)
        self.decoder = IncrementalDecoder(model.tokenizer)
        self._executor = executor
        self._slot = slot
        self._on_closed = on_closed
        self._turn = asyncio.Lock()
        self._tickets_issued = 0
        self._tickets_finished = 0
        self._stopped_through = 0  # generations with a ticket up to this one stop
        self._step_in_flight: Optional[Future] = None
        self._step_started: Optional[float] = None  # when the step in flight left the executor's queue
        self._closing: Optional["asyncio.Future[None]"] = None
        self.carried: Optional[StepResult] = None  # chosen ahead by a stopped generation, not yet sent
        self.last_active = time.monotonic()
        self.closed_reason: Optional[str] = None

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
                async for update in run_generation(self, request, ticket):
                    tokens += update.token_count
                    yield update
            self.log.info("Generated %d tokens in %.2f s", tokens, time.monotonic() - started)
        except Exception as error:
            if not (isinstance(error, ServiceError) and error.session_survives):
                await self.aclose(f"failed: {getattr(error, 'code', 'internal error')}")
            raise
        finally:
            self._tickets_finished += 1
            self.last_active = time.monotonic()

    def continue_for(self, connection_id: str) -> int:
        """Takes the session, left by a finished request, for another request (``connection_id``)
        whose prompt continues its tokens; returns how many of them the swarm already holds.
        The token chosen last was never fed: the new prompt says what follows."""
        self.stream.discard_pending()
        self.carried = None
        self.last_active = time.monotonic()
        self.log.info("Continues as %s, %d tokens already in the swarm", connection_id, self.stream.position)
        return self.stream.position

    def request_stop(self) -> None:
        """Ends every generation requested so far, before its next step."""
        self._stopped_through = self._tickets_issued

    def stopped(self, ticket: int) -> bool:
        """Whether the generation holding ``ticket`` must end now."""
        return ticket <= self._stopped_through or self.closed_reason is not None

    def _check_open(self) -> None:
        if self.closed_reason is not None:
            raise SessionExpired(f"Session {self.session_id} expired ({self.closed_reason}); "
                                 "open a new inference session")

    def encode(self, text: str) -> "asyncio.Future[List[int]]":
        """Token ids of ``text`` (tokenized in the executor)."""
        return self._executor.run(self.model.encode, text)

    def length_with(self, new_input_ids: list) -> int:
        """Tokens in the conversation once ``new_input_ids`` are added, the pending one included."""
        return self.stream.position + (self.stream.pending is not None) + len(new_input_ids)

    def start_step(self, new_input_ids: list, sampling: SamplingParams,
                   run_ahead: Optional[RunAhead] = None) -> StartedStep:
        """Starts one step in the executor; ``finish_step`` waits for its result. When
        ``run_ahead`` allows, the worker starts the step after it as soon as this one is done."""
        if self.length_with(new_input_ids) > self.max_length:
            needed = self.length_with(new_input_ids) - self.stream.position
            raise MaxLengthExceeded(
                f"Maximum length exceeded: prefix {self.stream.position} + current {needed} exceeds "
                f"pre-allocated maximum {self.max_length}")
        return self._submit_step(new_input_ids, sampling, run_ahead)

    def _submit_step(self, new_input_ids: list, sampling: SamplingParams,
                     run_ahead: Optional[RunAhead]) -> StartedStep:
        step = StartedStep(Future(), time.monotonic(), len(new_input_ids))
        self._step_started = None
        self._step_in_flight = step.future
        self._queue_steps(step, new_input_ids, sampling, run_ahead)
        return step

    def _queue_steps(self, step: StartedStep, new_input_ids: list, sampling: SamplingParams,
                     run_ahead: Optional[RunAhead]) -> None:
        job = self._executor.submit(self._run_steps, step, new_input_ids, sampling, run_ahead)
        # A call dropped while queued (the executor shutting down) never runs: its step ends too.
        job.add_done_callback(lambda job: step.future.cancel() if job.cancelled() else None)

    async def finish_step(self, step: StartedStep) -> StepResult:
        """The result of a started step, once it is done (``StepTimeout`` if it runs too long)."""
        model = self.model.spec.key
        try:
            result = await self._within_step_timeout(step.future)
        except StepTimeout:
            self.metrics.observe_failed_step(model)
            raise
        except Exception as error:
            self.metrics.observe_failed_step(model)
            raise from_petals_error(error, model) from error
        self.metrics.observe_step(model, time.monotonic() - step.started, step.input_tokens)
        # The reservation made at opening counted one span; a route through several holds more.
        self._slot.reserve(self.max_length * self.model.state_bytes_per_token * max(1, self.stream.span_count))
        return result

    def _run_steps(self, step: StartedStep, new_input_ids: list, sampling: SamplingParams,
                   run_ahead: Optional[RunAhead]) -> None:
        """In a worker thread: runs ``step``, then each next step ``run_ahead`` allows, in this
        thread while no other call waits for one, else queued behind those calls.

        Going on at once, rather than once the token has reached the event loop, keeps the
        loop's work on the token (its reply, the frame) off the path between two swarm steps.
        The generation touches the stream and the decoder only between steps, so the one step
        in flight has them to itself.
        """
        while step.future.set_running_or_notify_cancel():
            try:
                self._step_started = time.monotonic()  # read by the event loop only once the timeout is due
                token = self.stream.step(new_input_ids, sampling)
                text = self.decoder.push([token])
                logprobs = self.stream.last_logprobs if sampling.logprobs is not None else None
                next_step = None
                if run_ahead is not None and run_ahead.allows(token, text):
                    next_step = StartedStep(Future(), time.monotonic(), 0)
                    self._step_started = None
                    self._step_in_flight = next_step.future  # before this step is seen to be done
            except BaseException as error:
                step.future.set_exception(error)
                return
            step.future.set_result(StepResult(token, text, logprobs, next_step))
            if next_step is None:
                return
            if self._executor.queue_depth:  # another session waits for a thread: it goes first
                try:
                    self._queue_steps(next_step, [], sampling, run_ahead)
                except RuntimeError as error:  # the executor is shutting down
                    next_step.future.set_exception(error)
                return
            step, new_input_ids = next_step, []

    async def _within_step_timeout(self, step: Future) -> StepResult:
        """The step's result; ``StepTimeout`` once it has run ``step_timeout`` seconds (time spent
        waiting for an executor thread does not count)."""
        loop = asyncio.get_running_loop()
        outcome: "asyncio.Future[StepResult]" = loop.create_future()

        def settle() -> None:  # on the event loop, once the step is done
            if outcome.done():
                return
            if step.cancelled():
                outcome.cancel()
            elif step.exception() is not None:
                outcome.set_exception(step.exception())
            else:
                outcome.set_result(step.result())

        def check_time() -> None:
            nonlocal timer
            started = self._step_started
            remaining = self.step_timeout if started is None else started + self.step_timeout - time.monotonic()
            if remaining > 0:
                timer = loop.call_later(remaining, check_time)
            elif not outcome.done():
                outcome.set_exception(StepTimeout(f"A generation step took longer than {self.step_timeout:.0f} s"))

        # One hop from the worker thread to the waiting task, which is on the way from a step to
        # its reply.
        step.add_done_callback(lambda _: loop.is_closed() or loop.call_soon_threadsafe(settle))
        timer = loop.call_later(self.step_timeout, check_time)
        try:
            return await outcome
        finally:
            timer.cancel()

    async def aclose(self, reason: str) -> None:
        """Ends the session: stops its generations, waits for a step in flight, releases its caches.

        Safe to call more than once and from several tasks: every caller returns once it is done.
        """
        if self._closing is None:
            self.closed_reason = reason
            self.request_stop()
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
            while (step := self._step_in_flight) is not None and not step.done():
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
