"""One client's chat session: a Petals inference session and the generations run in it."""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Tuple, TypeVar

from sessions.decoding import IncrementalDecoder
from sessions.errors import InvalidRequest, MaxLengthExceeded, SessionExpired, StepTimeout, from_petals_error
from sessions.generation import SamplingParams, TokenStream
from sessions.metrics import SessionMetrics
from sessions.models import LoadedModel

T = TypeVar("T")
RunBlocking = Callable[..., "asyncio.Future[T]"]


@dataclass(frozen=True)
class GenerationRequest:
    """One ``generate``: new input text, length limits, sampling, and when to stop streaming."""

    inputs: Optional[str] = None
    max_length: Optional[int] = None  # total tokens in the session, prefix included
    max_new_tokens: Optional[int] = None  # tokens per reply
    sampling: SamplingParams = SamplingParams()
    stop_sequence: Optional[str] = None  # stream replies until the text contains it
    extra_stop_sequences: Tuple[str, ...] = ()  # also end the stream (with a stop_sequence: as its token)
    until_length: bool = False  # keep replying until a stop, EOS or max_length, even without stop_sequence

    @property
    def streaming(self) -> bool:
        """Whether replies continue until a stop condition rather than after the first one."""
        return self.stop_sequence is not None or self.until_length


@dataclass(frozen=True)
class GenerationUpdate:
    """One reply of a generation: the new text, whether it is the last, and its token count."""

    outputs: str
    stop: bool
    token_count: int
    finish_reason: Optional[str] = None  # on the last reply: "stop" (stop text or EOS), "length", "cancelled"


class ChatSession:
    """A client's Petals inference session and the text state of its conversation.

    Generations run one at a time, in the order they were requested; ``request_stop`` ends
    the running and the waiting ones before their next step. Blocking work goes through
    ``run_blocking`` (the manager's executor).
    """

    def __init__(self, session_id: str, loaded: LoadedModel, max_length: int, run_blocking: RunBlocking,
                 step_timeout: float, metrics: SessionMetrics, log: logging.LoggerAdapter, client: str):
        self.session_id = session_id
        self.client = client  # the address whose sessions count against its limit
        self.loaded = loaded
        self.max_length = max_length
        self.step_timeout = step_timeout
        self.metrics = metrics
        self.log = log
        self._run_blocking = run_blocking
        self._stream = TokenStream(loaded, max_length)
        self._decoder = IncrementalDecoder(loaded.tokenizer)
        self._turn = asyncio.Lock()
        self._tickets_issued = 0
        self._tickets_finished = 0
        self._stopped_through = 0  # generations with a ticket up to this one stop
        self.last_active = time.monotonic()
        self.closed_reason: Optional[str] = None

    def take_ticket(self) -> int:
        """A place in the line of generations, taken when the request arrives."""
        self._tickets_issued += 1
        return self._tickets_issued

    @property
    def has_generations(self) -> bool:
        """Whether a generation is running or waiting for its turn."""
        return self._tickets_finished < self._tickets_issued

    def request_stop(self) -> None:
        """Ends every generation requested so far, before its next step."""
        self._stopped_through = self._tickets_issued

    def _stopped(self, ticket: int) -> bool:
        return ticket <= self._stopped_through or self.closed_reason is not None

    def _check_open(self) -> None:
        if self.closed_reason is not None:
            raise SessionExpired(f"Session {self.session_id} expired ({self.closed_reason}); "
                                 "open a new inference session")

    def _stop_token_id(self, request: GenerationRequest) -> Optional[int]:
        """The single token of ``stop_sequence``, required when extra stop sequences are given."""
        if not request.extra_stop_sequences or request.stop_sequence is None:
            return None
        ids = self.loaded.encode(request.stop_sequence or "")
        if len(ids) != 1:
            raise InvalidRequest("extra_stop_sequences need a stop_sequence that is exactly one token "
                                 f"({request.stop_sequence!r} is {len(ids)} tokens)")
        return ids[0]

    def _total_length(self, new_input_ids: list) -> int:
        """Tokens in the conversation once ``new_input_ids`` are added, the pending one included."""
        return self._stream.position + (self._stream.pending is not None) + len(new_input_ids)

    async def _step(self, new_input_ids: list, sampling: SamplingParams) -> int:
        if self._total_length(new_input_ids) > self.max_length:
            needed = self._total_length(new_input_ids) - self._stream.position
            raise MaxLengthExceeded(
                f"Maximum length exceeded: prefix {self._stream.position} + current {needed} exceeds "
                f"pre-allocated maximum {self.max_length}")
        model = self.loaded.spec.key
        started = time.monotonic()
        try:
            token = await asyncio.wait_for(self._run_blocking(self._stream.step, new_input_ids, sampling),
                                           self.step_timeout)
        except asyncio.TimeoutError:
            self.metrics.observe_failed_step(model)
            raise StepTimeout(f"A generation step took longer than {self.step_timeout:.0f} s") from None
        except Exception as error:
            self.metrics.observe_failed_step(model)
            raise from_petals_error(error, model) from error
        self.metrics.observe_step(model, time.monotonic() - started, len(new_input_ids))
        return token

    async def generate(self, request: GenerationRequest, ticket: int) -> AsyncIterator[GenerationUpdate]:
        """Runs one generation, yielding its replies; the last one has ``stop=True``."""
        async with self._turn:
            try:
                async for update in self._generate(request, ticket):
                    yield update
            finally:
                self._tickets_finished += 1
                self.last_active = time.monotonic()

    async def _generate(self, request: GenerationRequest, ticket: int) -> AsyncIterator[GenerationUpdate]:
        self._check_open()
        if self._stopped(ticket):
            yield GenerationUpdate(outputs="", stop=True, token_count=0, finish_reason="cancelled")
            return
        stop_token_id = self._stop_token_id(request)
        input_ids = await self._run_blocking(self.loaded.encode, request.inputs) if request.inputs else []
        if not input_ids and self._stream.pending is None:
            raise InvalidRequest("inputs are required to start a session")
        total_limit = min(self.max_length, request.max_length or self.max_length)
        stop_sequences = [*filter(None, [request.stop_sequence]), *request.extra_stop_sequences]
        eos_token_id = self.loaded.tokenizer.eos_token_id
        self._decoder.add_context(input_ids)
        text = ""
        while True:
            chunk_tokens, chunk_text, finish_reason = 0, "", None
            while request.max_new_tokens is None or chunk_tokens < request.max_new_tokens:
                if self._stopped(ticket):
                    yield GenerationUpdate(outputs=chunk_text, stop=True, token_count=chunk_tokens,
                                           finish_reason="cancelled")
                    return
                if request.max_length is not None and self._total_length(input_ids) + 1 > total_limit:
                    finish_reason = "length"  # the client's max_length is reached
                    break
                token = await self._step(input_ids, request.sampling)
                input_ids = []
                chunk_tokens += 1
                chunk_text += self._decoder.push([token])
                self.log.debug("step %d: token %d", self._stream.position, token)
                if token == eos_token_id:
                    finish_reason = "stop"
                    break
            text += chunk_text
            matched = [sequence for sequence in stop_sequences if sequence in text]
            if matched and stop_token_id is not None and request.stop_sequence not in matched:
                # The next turn must follow the stop token, as if the model had written it.
                self._stream.replace_pending(stop_token_id)
            if matched:
                finish_reason = "stop"
            elif finish_reason is None and not request.streaming:
                finish_reason = "length"  # the one reply has its max_new_tokens
            yield GenerationUpdate(outputs=chunk_text, stop=finish_reason is not None, token_count=chunk_tokens,
                                   finish_reason=finish_reason)
            if finish_reason is not None:
                return

    async def wait_idle(self) -> None:
        """Returns once no generation is running."""
        async with self._turn:
            pass

    def close(self, reason: str) -> Optional[TokenStream]:
        """Marks the session closed; returns the stream whose swarm session must be released."""
        if self.closed_reason is not None:
            return None
        self.closed_reason = reason
        self.request_stop()
        return self._stream
