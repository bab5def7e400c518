"""A session's swarm steps in the executor: one at a time, each able to start the next itself.

A step feeds tokens through the token stream and chooses the next token (or several, when it
verifies a draft), through the session's positions (the one code that moves them); the worker
thread also turns those tokens into text.
When the generation surely goes on (its ``RunAhead`` says), the step starts the next one before
its result reaches the event loop, so the loop's work on a token (its reply, the frame)
overlaps the next swarm step instead of delaying it.
"""

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Protocol, Sequence, Tuple

from sessions.engine.decoding import IncrementalDecoder
from sessions.engine.executor import BlockingExecutor
from sessions.engine.speculation import Speculation
from sessions.errors import StepTimeout
from sessions.requests import ChosenTokenLogprobs, SamplingParams


@dataclass(frozen=True)
class StartedStep:
    """A step queued or running in the executor: its future, when it was started, how many
    inputs it feeds."""

    future: Future
    started: float
    input_tokens: int


@dataclass(frozen=True)
class ChosenToken:
    """One token a step chose: its id, the text it adds, its log-probabilities when asked for."""

    token: int
    text: str
    logprobs: Optional[ChosenTokenLogprobs] = None


@dataclass(frozen=True)
class StepResult:
    """What one step chose: its tokens in order (one, or more when the step verified a draft:
    the swarm holds every one but the last, which is pending), and the next step when this one
    started it (see ``RunAhead``)."""

    tokens: Tuple[ChosenToken, ...]
    next_step: Optional[StartedStep] = None

    @property
    def last(self) -> ChosenToken:
        """The step's last token: the one chosen but not yet fed."""
        return self.tokens[-1]


class RunAhead(Protocol):
    """Decides, in the worker thread that just ran a step, whether the next one starts at once;
    it may also give the steps a draft to verify."""

    speculation: Optional[Speculation]

    def allows(self, tokens: Sequence[ChosenToken]) -> bool:
        """Whether the generation surely goes on after ``tokens``."""


class Advancing(Protocol):
    """What moves a token stream on by one step (a session's ``SessionPositions``)."""

    def advance(self, new_input_ids: list, sampling: SamplingParams,
                speculation: Optional[Speculation] = None) -> Sequence[int]:
        """Feeds the pending token and ``new_input_ids`` (and a draft ``speculation`` proposes);
        returns the tokens chosen, the last one now pending."""


class StepRunner:
    """Runs the steps of one token stream (``stream``, a ``TokenStream`` or a test's fake), each
    one ``positions.advance``, in ``executor``, one at a time, in ``owner``'s turn among the
    executor's callers, and waits for their results within ``step_timeout``.

    The generation touches the stream and ``decoder`` only between steps, so the one step in
    flight has them to itself.
    """

    def __init__(self, stream: Any, positions: Advancing, decoder: IncrementalDecoder, executor: BlockingExecutor,
                 step_timeout: float, owner: Hashable = None, model: Hashable = None):
        self.stream = stream
        self.owner = owner  # whose turn in the executor the steps take (the session's client)
        self.model = model  # whose steps they are, as the executor learns the steps' times
        self.positions = positions
        self.decoder = decoder
        self.step_timeout = step_timeout
        self.in_flight: Optional[Future] = None  # the latest step started (done or not)
        self._executor = executor
        self._running_since: Optional[float] = None  # when the step in flight left the executor's queue

    def start(self, new_input_ids: list, sampling: SamplingParams, run_ahead: Optional[RunAhead]) -> StartedStep:
        """Queues a step feeding ``new_input_ids``; ``result`` waits for it."""
        step = StartedStep(Future(), time.monotonic(), len(new_input_ids))
        self._running_since = None
        self.in_flight = step.future
        self._queue(step, new_input_ids, sampling, run_ahead)
        return step

    def start_call(self, input_tokens: int, function: Callable[..., Any], *args: Any) -> StartedStep:
        """Queues ``function(*args)`` as one step of the stream's own kind (a step of several rows,
        say), feeding ``input_tokens``: run, timed and waited for (``result``) as any step, its
        result is what ``function`` returns."""
        step = StartedStep(Future(), time.monotonic(), input_tokens)
        self._running_since = None
        self.in_flight = step.future
        self._submit(step, self._call, step, function, args)
        return step

    def _queue(self, step: StartedStep, new_input_ids: list, sampling: SamplingParams,
               run_ahead: Optional[RunAhead]) -> None:
        self._submit(step, self._run, step, new_input_ids, sampling, run_ahead)

    def _submit(self, step: StartedStep, function: Callable[..., None], *args: Any) -> None:
        job = self._executor.submit(function, *args, owner=self.owner)
        # A call dropped while queued (the executor shutting down) never runs: its step ends too.
        job.add_done_callback(lambda job: step.future.cancel() if job.cancelled() else None)

    def _timed(self, function: Callable[..., Any], *args: Any) -> Any:
        # In a worker thread: one swarm step, whose time the executor learns from.
        self._running_since = started = time.monotonic()  # read by the event loop once the timeout is due
        alone = self._executor.running_alone
        result = function(*args)
        self._executor.step_done(self.model, time.monotonic() - started, alone)
        return result

    def _call(self, step: StartedStep, function: Callable[..., Any], args: tuple) -> None:
        # In a worker thread: a step of ``start_call``.
        if step.future.set_running_or_notify_cancel():
            try:
                result = self._timed(function, *args)
            except BaseException as error:
                step.future.set_exception(error)
                return
            step.future.set_result(result)

    def _run(self, step: StartedStep, new_input_ids: list, sampling: SamplingParams,
             run_ahead: Optional[RunAhead]) -> None:
        # In a worker thread: runs ``step``, then each next one ``run_ahead`` allows, in this
        # thread while no other call waits for one, else queued behind those calls.
        while step.future.set_running_or_notify_cancel():
            try:
                speculation = run_ahead.speculation if run_ahead is not None else None
                token_ids = self._timed(self.positions.advance, new_input_ids, sampling, speculation)
                logprobs = self.stream.last_logprobs if sampling.logprobs is not None else [None] * len(token_ids)
                chosen = tuple(ChosenToken(token, self.decoder.push([token]), token_logprobs)
                               for token, token_logprobs in zip(token_ids, logprobs))
                next_step = None
                if run_ahead is not None and run_ahead.allows(chosen):
                    next_step = StartedStep(Future(), time.monotonic(), 0)
                    self._running_since = None
                    self.in_flight = next_step.future  # before this step is seen to be done
            except BaseException as error:
                step.future.set_exception(error)
                return
            step.future.set_result(StepResult(chosen, next_step))
            if next_step is None:
                return
            if self._executor.queue_depth:  # another session waits for a thread: it goes first
                try:
                    self._queue(next_step, [], sampling, run_ahead)
                except RuntimeError as error:  # the executor is shutting down
                    next_step.future.set_exception(error)
                return
            step, new_input_ids = next_step, []

    async def result(self, step: StartedStep) -> StepResult:
        """The step's result; ``StepTimeout`` once it has run ``step_timeout`` seconds (time spent
        waiting for an executor thread does not count)."""
        loop = asyncio.get_running_loop()
        outcome: "asyncio.Future[StepResult]" = loop.create_future()

        def settle() -> None:  # on the event loop, once the step is done
            if outcome.done():
                return
            if step.future.cancelled():
                outcome.cancel()
            elif step.future.exception() is not None:
                outcome.set_exception(step.future.exception())
            else:
                outcome.set_result(step.future.result())

        def check_time() -> None:
            nonlocal timer
            since = self._running_since
            remaining = self.step_timeout if since is None else since + self.step_timeout - time.monotonic()
            if remaining > 0:
                timer = loop.call_later(remaining, check_time)
            elif not outcome.done():
                outcome.set_exception(StepTimeout(f"A generation step took longer than {self.step_timeout:.0f} s"))

        # One hop from the worker thread to the waiting task: it is on the way from a step to
        # its reply.
        step.future.add_done_callback(lambda _: loop.is_closed() or loop.call_soon_threadsafe(settle))
        timer = loop.call_later(self.step_timeout, check_time)
        try:
            return await outcome
        finally:
            timer.cancel()
