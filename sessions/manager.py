"""The session manager: owns the bounded executor, the loaded models, every client session
and every task it starts."""

import asyncio
import collections
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable, Dict, List, Optional, Sequence, Set, TypeVar, Union

from config import PUBLIC_SWARM, ManagerSettings, ModelSpec
from sessions.errors import (
    ClientLimit,
    InvalidRequest,
    MaxLengthExceeded,
    NotReady,
    ServerBusy,
    SessionError,
    SessionStateError,
    UnknownModel,
)
from sessions.metrics import SessionMetrics
from sessions.models import LoadedModel, load_model
from sessions.session import ChatSession, GenerationRequest, GenerationUpdate
from sessions.swarm_state import ModelRoute, probe_model

logger = logging.getLogger(__name__)

T = TypeVar("T")
Reply = Union[GenerationUpdate, SessionError]
SendReply = Callable[[Reply], Awaitable[None]]
# Errors after which the session's state is intact and the client may go on using it.
RECOVERABLE_ERRORS = (InvalidRequest, MaxLengthExceeded, SessionStateError)
# A swarm lookup is reused for this long, so frequent /ready probes cost one DHT query.
SWARM_STATE_MAX_AGE = 2.0


def connection_log(connection_id: str) -> logging.LoggerAdapter:
    """A logger that puts the connection id on every line."""
    return _ConnectionLogAdapter(logger, {"connection_id": connection_id})


class _ConnectionLogAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['connection_id']}] {msg}", kwargs


def resolve_initial_peers(initial_peers: Sequence[str]) -> List[str]:
    """Expands the word ``public`` into the public swarm's bootstrap peers."""
    if list(initial_peers) == [PUBLIC_SWARM]:
        from petals.constants import PUBLIC_INITIAL_PEERS

        return list(PUBLIC_INITIAL_PEERS)
    return list(initial_peers)


class SessionManager:
    """Everything that talks to the swarm goes through here.

    Blocking Petals calls run in one bounded thread pool (``run_blocking``), never on the
    event loop; swarm lookups for health checks run in a one-thread pool of their own, so a
    busy server still answers ``/ready``. ``start`` connects every model; ``close`` tears
    everything down. At a limit of ``settings`` a request is refused at once, never queued.
    """

    def __init__(
        self,
        models: Sequence[ModelSpec],
        initial_peers: Sequence[str],
        device: str,
        torch_dtype: str,
        executor_workers: int = 8,
        settings: ManagerSettings = ManagerSettings(),
    ):
        self.specs = tuple(models)
        self.initial_peers = resolve_initial_peers(initial_peers)
        self.device = device
        self.torch_dtype = torch_dtype
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=executor_workers, thread_name_prefix="petals")
        self._probe_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-probe")
        self._models: Dict[str, LoadedModel] = {}
        self._by_name: Dict[str, LoadedModel] = {}
        self._sessions: Dict[str, ChatSession] = {}
        self._open_streams = 0
        self._streams_by_client: Dict[str, int] = collections.Counter()  # open sessions per client address
        self._queued_calls = 0
        self._queued_calls_lock = threading.Lock()
        self._swarm_state: Optional["asyncio.Future[List[ModelRoute]]"] = None
        self._swarm_state_time = 0.0
        self._tasks: Set[asyncio.Task] = set()
        self._reaper: Optional[asyncio.Task] = None
        self.metrics = SessionMetrics(open_sessions=lambda: self._open_streams,
                                      executor_queue_depth=lambda: self._queued_calls)

    def run_blocking(self, function: Callable[..., T], *args, **kwargs) -> "asyncio.Future[T]":
        """Runs a blocking call in the bounded executor; await the returned future for its result.

        A plain future, not a coroutine: a generation step awaits it with a timeout, and a
        coroutine would cost a task per step.
        """
        loop = asyncio.get_running_loop()
        with self._queued_calls_lock:
            self._queued_calls += 1
        return loop.run_in_executor(self.executor, functools.partial(self._run_queued, function, *args, **kwargs))

    def _run_queued(self, function: Callable[..., T], *args, **kwargs) -> T:
        with self._queued_calls_lock:
            self._queued_calls -= 1
        return function(*args, **kwargs)

    def _spawn(self, coroutine: Awaitable[None], name: str) -> asyncio.Task:
        """Starts a task this manager owns: tracked until done, cancelled at shutdown."""
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("Task %s failed", task.get_name(), exc_info=task.exception())

    async def start(self) -> None:
        """Connects the client of every declared model to the swarm and starts the idle reaper."""
        for spec in self.specs:
            loaded = await self.run_blocking(load_model, spec, self.initial_peers, self.device, self.torch_dtype,
                                             self.settings)
            self._models[spec.key] = loaded
            for name in spec.names():
                self._by_name[name] = loaded
        self._reaper = self._spawn(self._expire_idle_sessions(), "idle-reaper")

    @property
    def open_session_count(self) -> int:
        """Inference sessions whose swarm resources are not yet released."""
        return self._open_streams

    async def open_session(self, connection_id: str, model_name: object, max_length: int,
                           client: str) -> ChatSession:
        """Opens the connection's inference session on the named model for ``client`` (an address)."""
        log = connection_log(connection_id)
        existing = self._sessions.get(connection_id)
        if existing is not None and existing.closed_reason is None:
            raise SessionStateError("An inference session is already open on this connection")
        loaded = self.find_model(model_name)
        limit = loaded.spec.chat.max_session_length
        if max_length > limit:
            raise InvalidRequest(f"max_length {max_length} exceeds this model's maximum session length {limit}")
        self._check_capacity(client)
        session = ChatSession(connection_id, loaded, max_length, self.run_blocking, self.settings.step_timeout,
                              self.metrics, log, client)
        self._sessions[connection_id] = session
        self._open_streams += 1
        self._streams_by_client[client] += 1
        self.metrics.sessions_opened.labels(loaded.spec.key).inc()
        log.info("Opened a session on %s for %s, max_length %d", loaded.spec.key, client, max_length)
        return session

    def _check_capacity(self, client: str) -> None:
        if self._open_streams >= self.settings.max_sessions:
            raise ServerBusy(f"This server holds its maximum of {self.settings.max_sessions} sessions; "
                             "try again shortly")
        if self._streams_by_client[client] >= self.settings.max_sessions_per_client:
            raise ClientLimit(f"This client already holds {self.settings.max_sessions_per_client} sessions, "
                              "the most one client may; close one first")

    @staticmethod
    def _check_request(loaded: LoadedModel, request: GenerationRequest) -> None:
        limit = loaded.spec.max_new_tokens_limit
        if request.max_new_tokens is not None and request.max_new_tokens > limit:
            raise InvalidRequest(f"max_new_tokens {request.max_new_tokens} exceeds this model's limit of {limit}")

    def start_generation(self, connection_id: str, request: GenerationRequest, send: SendReply) -> None:
        """Queues a generation on the connection's session; its replies go to ``send``."""
        session = self._sessions.get(connection_id)
        if session is None:
            raise SessionStateError("Open an inference session first (type: open_inference_session)")
        self._check_request(session.loaded, request)
        ticket = session.take_ticket()
        self._spawn(self._run_generation(session, request, ticket, send), f"generate-{connection_id}-{ticket}")

    async def _run_generation(self, session: ChatSession, request: GenerationRequest, ticket: int,
                              send: SendReply) -> None:
        started, tokens = time.monotonic(), 0
        try:
            async for update in session.generate(request, ticket):
                tokens += update.token_count
                await send(update)
            session.log.info("Generated %d tokens in %.2f s", tokens, time.monotonic() - started)
        except SessionError as error:
            session.log.warning("Generation failed: %s", error)
            if not isinstance(error, RECOVERABLE_ERRORS):
                await self._release(session, f"failed: {error.code}")
            await send(error)
        except Exception as error:
            session.log.exception("Generation failed unexpectedly")
            await self._release(session, "failed: internal error")
            await send(SessionError(f"Internal error: {type(error).__name__}"))

    async def one_shot(self, connection_id: str, model_name: object, request: GenerationRequest,
                       client: str) -> AsyncIterator[GenerationUpdate]:
        """A generation in a session of its own (the HTTP APIs): sized to fit, closed when done.

        The session holds the prompt plus ``max_new_tokens`` unless ``max_length`` says more.
        ``close_connection(connection_id)`` stops it early (the client went away).
        """
        if not request.inputs:
            raise InvalidRequest("inputs must not be empty")
        self._check_request(self.find_model(model_name), request)
        self._check_capacity(client)  # before tokenizing: a refusal costs nothing
        max_length = request.max_length or await self.count_tokens(model_name, request.inputs) + request.max_new_tokens
        session = await self.open_session(connection_id, model_name, max_length, client)
        try:
            async for update in session.generate(request, session.take_ticket()):
                yield update
        finally:
            session = self._sessions.pop(connection_id, None)
            if session is not None:  # not already torn down by a disconnect
                await self._release(session, "request done")

    async def count_tokens(self, model_name: object, text: str) -> int:
        """How many tokens ``text`` is for the named model."""
        loaded = self.find_model(model_name)
        return len(await self.run_blocking(loaded.encode, text))

    def stop_generation(self, connection_id: str) -> bool:
        """Ends the connection's running and queued generations; False if there was none."""
        session = self._sessions.get(connection_id)
        if session is None or not session.has_generations:
            return False
        session.request_stop()
        session.log.info("Stop requested")
        return True

    async def _release(self, session: ChatSession, reason: str) -> None:
        """Closes the session and frees its attention caches in the swarm."""
        stream = session.close(reason)
        if stream is None:
            return
        await session.wait_idle()  # a step in flight finishes before its session goes
        try:
            await self.run_blocking(stream.close)
        except Exception:
            session.log.exception("Error while closing the inference session")
        finally:
            self._open_streams -= 1
            self._streams_by_client[session.client] -= 1
            if not self._streams_by_client[session.client]:
                del self._streams_by_client[session.client]
            session.log.info("Closed the session (%s)", reason)

    def close_connection(self, connection_id: str, reason: str = "connection closed") -> None:
        """Tears down the connection's session (in the background: a step may be running)."""
        session = self._sessions.pop(connection_id, None)
        if session is not None:
            session.request_stop()
            self._spawn(self._release(session, reason), f"close-{connection_id}")

    async def _expire_idle_sessions(self) -> None:
        period = max(0.5, min(5.0, self.settings.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for session in list(self._sessions.values()):
                idle = now - session.last_active
                if session.closed_reason is None and not session.has_generations and idle > self.settings.idle_timeout:
                    await self._release(session, f"idle for {idle:.0f} s")

    async def swarm_state(self) -> List[ModelRoute]:
        """Every model's servers and missing blocks, from a DHT lookup at most a few seconds old."""
        if not self._models:
            raise NotReady("The server is still connecting to the swarm; try again shortly")
        fresh = time.monotonic() - self._swarm_state_time < SWARM_STATE_MAX_AGE
        if self._swarm_state is None or (self._swarm_state.done() and not fresh):
            # Concurrent callers share one lookup; the next caller after it ages starts another.
            loop = asyncio.get_running_loop()
            self._swarm_state = loop.run_in_executor(self._probe_executor, self._probe_all, self.models)
            self._swarm_state_time = time.monotonic()
        return await asyncio.shield(self._swarm_state)

    @staticmethod
    def _probe_all(models: List[LoadedModel]) -> List[ModelRoute]:
        return [probe_model(loaded) for loaded in models]

    @property
    def models(self) -> List[LoadedModel]:
        """Connected models, in declaration order."""
        return list(self._models.values())

    def find_model(self, name: object) -> LoadedModel:
        """The model a client named by repository, adapter or alias; None names the first model."""
        if not self._models:
            raise NotReady("The server is still connecting to the swarm; try again shortly")
        if name is None:
            return next(iter(self._models.values()))
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise UnknownModel(name, list(self._models)) from None

    async def close(self, grace: float = 10.0) -> None:
        """Closes every session, disconnects every model, stops the executor.

        Generations are stopped, not cancelled: a step running in the executor cannot be
        interrupted, and its session must outlive it. Tasks still running after ``grace``
        seconds are cancelled.
        """
        if self._reaper is not None:
            self._reaper.cancel()
        for connection_id in list(self._sessions):
            self.close_connection(connection_id, "server shutdown")
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                logger.warning("Task %s still running at shutdown, cancelling it", task.get_name())
                task.cancel()
        models, self._models, self._by_name = list(self._models.values()), {}, {}
        for loaded in models:
            try:
                await self.run_blocking(loaded.close)
            except Exception:
                logger.exception("Error while disconnecting %s", loaded.spec.key)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._probe_executor.shutdown(wait=False, cancel_futures=True)
