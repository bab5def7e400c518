"""The session manager: opens, closes and reaps chat sessions, and owns every task it starts.

``build_manager`` wires the parts the server runs on: one executor for blocking calls, the
model registry, admission control, the swarm monitor and the metrics.
"""

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any, Awaitable, Callable, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, TypeVar

from config import PUBLIC_SWARM, Settings
from model_specs import ModelSpec
from sessions import request_rules
from sessions.accounts.book import AccountBook
from sessions.engine.executor import BlockingExecutor, TakingTurns
from sessions.engine.grammar import GrammarCompiler, constrained
from sessions.engine.in_flight import AdaptiveInFlight
from sessions.engine.row_stream import RowsTokenStream
from sessions.engine.token_stream import TokenStream
from sessions.errors import ClientLimit, InvalidRequest, MemoryBudgetExceeded, ServerBusy
from sessions.models import LoadedModel
from sessions.observe.metrics import SessionMetrics
from sessions.observe.server_latency import ServerLatency
from sessions.observe.swarm_state import SwarmMonitor
from sessions.requests import GenerationRequest, SamplingParams
from sessions.serving.admission import Admission
from sessions.serving.registry import ModelRegistry
from sessions.serving.resumable import ResumableSessions
from sessions.serving.session import ChatSession
from sessions.serving.waiting_room import WaitingRoom
from sessions.serving.warm_pool import WarmPool

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Hears a waiting session's place in line (1: next), whenever it changes.
QueuedCallback = Optional[Callable[[int], None]]

# Threads that tokenize prompts: apart from the step executor, so that a flood of long prompts
# never delays anyone's steps, and other clients' prompts by one prompt per thread at most.
TOKENIZER_THREADS = 2


class RequestSession(NamedTuple):
    """A stateless request's session, the request as it runs there (its prompt tokenized, without
    the tokens the session already holds) and how many prompt tokens the session already held."""

    session: ChatSession
    request: GenerationRequest
    cached_tokens: int


def resolve_initial_peers(initial_peers: Sequence[str]) -> List[str]:
    """Expands the word ``public`` into the public swarm's bootstrap peers."""
    if list(initial_peers) == [PUBLIC_SWARM]:
        from swarm.petals_api import PUBLIC_INITIAL_PEERS

        return list(PUBLIC_INITIAL_PEERS)
    return list(initial_peers)


class SessionManager:
    """Every chat session goes through here: opened within the limits, reaped when idle, closed at shutdown.

    Tasks started through ``spawn`` are tracked until done and given a grace period at
    shutdown. The collaborators are public so that the app factory can hand each handler what
    it needs: ``registry`` (models), ``admission`` (limits), ``executor`` (blocking calls),
    ``monitor`` (swarm routes), ``metrics``, ``server_latency`` (recent step times per swarm
    server), ``warm`` (finished sessions kept for prefix reuse) and ``resumable`` (WebSocket
    sessions that may outlive their connection).
    """

    def __init__(self, registry: ModelRegistry, admission: Admission, executor: BlockingExecutor,
                 monitor: SwarmMonitor, metrics: SessionMetrics, settings: Settings, accounts: AccountBook,
                 warm: Optional[WarmPool] = None, server_latency: Optional[ServerLatency] = None,
                 tokenizer_pool: Optional[TakingTurns] = None, grammars: Optional[GrammarCompiler] = None,
                 open_stream: Callable[[LoadedModel, int], Any] = TokenStream,
                 open_rows: Callable[[LoadedModel, int, int], Any] = RowsTokenStream):
        self.registry = registry
        self.accounts = accounts
        self.admission = admission
        self.executor = executor
        # Prompts are tokenized apart from the steps, clients taking turns.
        self.tokenizer_pool = tokenizer_pool or TakingTurns(TOKENIZER_THREADS, "tokenize")
        self.grammars = grammars or GrammarCompiler()  # JSON schemas and grammars, compiled apart from the steps
        self.monitor = monitor
        self.metrics = metrics
        self.settings = settings
        self.warm = warm if warm is not None else WarmPool(settings.warm_pool_limits)
        self.server_latency = server_latency or ServerLatency(metrics.observe_server_step)
        self.resumable = ResumableSessions(settings.resume_grace)
        # New sessions wait here for room on a full server (as the server's setting allows).
        self.waiting_room = WaitingRoom(
            settings.queue_size, min(settings.queue_size, settings.max_sessions_per_client),
            (ServerBusy, MemoryBudgetExceeded),
            full_error=lambda reason: ServerBusy(f"This server is full, and {reason}; try again later"),
            timeout_error=lambda reason: ServerBusy(f"This server is full: {reason}; try again later"))
        admission.session_released = self.waiting_room.room_freed
        metrics.waiting_sessions.set_function(lambda: self.waiting_room.waiting)
        self._open_stream = open_stream  # a model and a length -> the session's token stream
        self._open_rows = open_rows  # a model, a length and a number of rows -> a stream of that many rows
        self._sessions: Set[ChatSession] = set()
        self._tasks: Set[asyncio.Task] = set()
        self._reaper: Optional[asyncio.Task] = None
        self._loop_watch: Optional[asyncio.Task] = None
        self._accounting: Optional[asyncio.Task] = None

    async def start(self) -> None:
        """Connects every model to the swarm and starts the idle reaper."""
        await self.registry.load()
        await self.accounts.start()
        self._accounting = self.spawn(self.accounts.run(), "accounting")
        self._reaper = self.spawn(self._expire_idle_sessions(), "idle-reaper")
        self._loop_watch = self.spawn(self.metrics.watch_event_loop(), "event-loop-lag")
        self.metrics.watch_gc()

    @property
    def open_session_count(self) -> int:
        """Sessions whose swarm resources are not yet released."""
        return self.admission.open_sessions

    def session_state_bytes(self) -> int:
        """Memory the open sessions hold on this machine (their client-side swarm state)."""
        return sum(session.stream.state_bytes for session in list(self._sessions) if not session.released)

    @property
    def task_names(self) -> List[str]:
        """Names of the tasks still running (``generate-<connection>``, ``close-<connection>``, ...)."""
        return [task.get_name() for task in self._tasks]

    def spawn(self, coroutine: Awaitable[None], name: str) -> asyncio.Task:
        """Starts a task this manager tracks until it ends (and waits for at shutdown)."""
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("Task %s failed", task.get_name(), exc_info=task.exception())

    async def open_session(self, connection_id: str, model_name: object, max_length: int, client: str,
                           trusted: bool = True, on_queued: QueuedCallback = None) -> ChatSession:
        """Opens an inference session of ``max_length`` tokens on the named model for ``client``;
        on a full server it waits its turn, ``on_queued(position)`` hearing of its place in line."""
        return await self._open(connection_id, self.find_model(model_name, client, trusted), max_length, client,
                                on_queued)

    def find_model(self, name: object, client: str, trusted: bool = True) -> LoadedModel:
        """The model ``client`` named (``registry.find``), if its account may use it (``ModelNotAllowed``)."""
        loaded = self.registry.find(name, trusted)
        self.accounts.account_for(client).check_model(loaded.spec.key)
        return loaded

    async def _open(self, connection_id: str, loaded: LoadedModel, max_length: int, client: str,
                    on_queued: QueuedCallback, rows: int = 1) -> ChatSession:
        request_rules.check_session_length(loaded.spec, max_length)
        # Every span of the route keeps each token's hidden state here, of each row: one span is reserved now.
        reserved = max_length * rows * loaded.state_bytes_per_token
        slot = await self._within_limits(client, lambda: self.admission.admit(client, reserved_bytes=reserved),
                                         on_queued)
        try:
            stream = self._open_rows(loaded, max_length, rows) if rows > 1 else self._open_stream(loaded, max_length)
        except BaseException:
            slot.release()
            raise
        session = ChatSession(connection_id, loaded, stream, max_length, self.executor, self.tokenizer_pool,
                              self.settings.step_timeout, self.metrics, slot, self.accounts.account_for(client),
                              on_closed=self._session_closed,
                              draft_tokens=self.settings.draft_tokens, rows=rows)
        self._sessions.add(session)
        self.metrics.sessions_opened.labels(loaded.spec.key).inc()
        session.log.info("Opened a session on %s for %s, max_length %d", loaded.spec.key, client, max_length)
        return session

    def _session_closed(self, session: ChatSession) -> None:
        self._sessions.discard(session)
        self.resumable.forget(session)

    def make_resumable(self, session: ChatSession, attachment: Any) -> str:
        """Lets ``session`` outlive its connection for the grace period; returns its resume token.
        ``attachment`` is handed back to the connection that resumes it."""
        return self.resumable.register(session, attachment)

    def detach(self, session: ChatSession) -> None:
        """A resumable session's connection dropped: the session waits for its client (its
        generations go on), and closes if nobody resumes it within the grace period."""
        self.resumable.detach(session)
        session.log.info("Waiting %.0f s for the client to resume the session", self.resumable.grace)

    def resume(self, session_id: object, token: object,
               check: Callable[[Any], None] = lambda attachment: None) -> Tuple[ChatSession, Any]:
        """The resumable session ``session_id`` and its attachment, if ``token`` is its resume token
        (and ``check(attachment)`` passes). The caller takes it over at once, then calls ``resumed``."""
        return self.resumable.resume(session_id, token, check)

    def resumed(self, session: ChatSession) -> None:
        """The connection that resumed ``session`` has taken it over (see ``resume``)."""
        self.resumable.resumed(session)

    async def open_for_request(self, connection_id: str, loaded: LoadedModel, request: GenerationRequest,
                               client: str, on_queued: QueuedCallback = None) -> RequestSession:
        """A session on ``loaded`` (``find_model``'s) for one request of the stateless APIs,
        with the request's prompt tokenized once.

        A warm session of the client that shares the prompt's beginning is continued (gone back to
        where they part), and the request then carries only the tokens it lacks; otherwise a
        session is opened for the prompt plus ``max_new_tokens`` (or for ``max_length``), with room
        for a next turn when reuse is on (on a full server, after waiting its turn: see ``open_session``).
        A request of several ``choices`` gets a session of as many rows, just long enough for it:
        never a warm one, and never kept warm (``finish_request``).
        """
        if not request.inputs and not request.input_ids:
            raise InvalidRequest("inputs must not be empty")
        request_rules.check_request(loaded.spec, request)
        if request.input_ids is None:
            request = dataclasses.replace(request, input_ids=tuple(await self.tokenize(loaded, request.inputs, client)))
        request_rules.check_new_tokens(loaded.spec, request)
        needed = request.max_length or len(request.input_ids) + request.max_new_tokens
        if request.choices > 1:
            return RequestSession(await self._open(connection_id, loaded, needed, client, on_queued, request.choices),
                                  request, 0)
        model = loaded.spec.key
        # The warm pool is matched before any limit may close a warm session to make room.
        warm, shared = self.warm.take(client, model, request.input_ids, needed) if self.warm.enabled else (None, 0)
        if warm is not None:
            cached = warm.continue_for(connection_id, shared)
            self.metrics.observe_prefix_reuse(model, cached)
            return RequestSession(warm, dataclasses.replace(request, input_ids=request.input_ids[cached:],
                                                            cached_tokens=cached), cached)
        if self.warm.enabled:
            self.metrics.observe_prefix_reuse(model, 0)
        max_length = self.warm.session_length(needed, loaded.spec.chat.max_session_length)
        session = await self._open(connection_id, loaded, max_length, client, on_queued)
        return RequestSession(session, request, 0)

    def finish_request(self, session: ChatSession, reusable: bool, reason: str) -> None:
        """Ends a stateless request's use of ``session``: kept warm for a request that continues it
        when ``reusable`` (it ran to its end) and the pool has room, else closed in the background,
        so that the reply never waits for the swarm to release it."""
        # Sessions waiting for room go before keeping a finished one warm; one of several rows serves no other request.
        kept = reusable and session.rows == 1 and not self.waiting_room.waiting
        leaving = self.warm.park(session) if kept else [session]
        for other in leaving:
            self.close_in_background(other, reason if other is session else "made room in the warm pool")

    async def check_constraint(self, loaded: LoadedModel, sampling: SamplingParams) -> None:
        """Compiles the JSON schema or grammar ``sampling`` constrains output with, if any (in the
        compiler's pool, and kept there for the generation): ``InvalidRequest`` naming the field
        when it is refused, before the request costs a session or a tokenization."""
        if constrained(sampling):
            await self.grammars.compile(loaded.tokenizer, sampling)

    async def tokenize(self, loaded: LoadedModel, text: str, client: str) -> List[int]:
        """The token ids of the prompt ``text`` of ``client``, who is about to open a session
        (tokenized in the tokenizer pool, taking turns with other clients). Refused without
        tokenizing when the client may not open a session now, or when the text is longer in
        characters than the model's longest session could hold."""
        self._check_room(client)
        request_rules.check_text_length(text, loaded.spec.chat.max_session_length, loaded.max_token_chars)
        return await self.tokenizer_pool.run(client, loaded.encode, text)

    def _check_room(self, client: str) -> None:
        """Raises unless ``client`` may open a session now. A warm session counts as room (of the
        client's own for its limit, anyone's for the server's): the request may continue it, and
        otherwise it is closed to make room only once the request's prompt is known."""
        try:
            self.admission.check_capacity(client)
        except ClientLimit:
            if not self.warm.holds(client):
                raise
        except ServerBusy:
            if not len(self.warm) and not self._may_wait(client):
                raise

    def _may_wait(self, client: str) -> bool:
        """Whether a new session of ``client`` may wait for room on a full server."""
        return self.settings.queue_timeout > 0 and self.waiting_room.has_place(client)

    async def _within_limits(self, client: str, admit: Callable[[], T], on_queued: QueuedCallback) -> T:
        """``admit()``, after closing warm sessions (the client's own first) while a limit refuses
        it; when the server is full, after waiting in line for room (``--queue-timeout``)."""
        if not self.waiting_room.waiting:  # else the sessions already waiting go first
            try:
                return await self._making_room(client, admit)
            except (ServerBusy, MemoryBudgetExceeded):
                if self.settings.queue_timeout <= 0:
                    raise
        logger.info("A session of %s waits for room (%d waiting)", client, self.waiting_room.waiting + 1)
        return await self.waiting_room.wait_for_room(client, admit, self.settings.queue_timeout,
                                                     on_queued or (lambda position: None))

    async def _making_room(self, client: str, admit: Callable[[], T]) -> T:
        """``admit()``, after closing warm sessions (the client's own first) while a limit refuses it."""
        while True:
            try:
                return admit()
            except (ClientLimit, ServerBusy, MemoryBudgetExceeded) as refusal:
                warm = self.warm.evict(client if isinstance(refusal, ClientLimit) else None)
                if warm is None:
                    raise
                await warm.aclose("made room for a new session")

    def close_in_background(self, session: ChatSession, reason: str) -> None:
        """Starts closing ``session`` without waiting (a step may be running)."""
        session.cancel_generations()
        self.spawn(session.aclose(reason), f"close-{session.connection_id}")

    async def _expire_idle_sessions(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, min(5.0, self.settings.idle_timeout / 4, self.warm.limits.max_age / 4,
                                             self.resumable.grace / 4)))
            for session in self.warm.expired():
                self.close_in_background(session, "not continued while warm")
            for session in self.resumable.expired():
                self.close_in_background(session, "not resumed within its grace period")
            now = time.monotonic()
            for session in list(self._sessions):
                idle = now - session.last_active
                if session.closed_reason is None and not session.has_generations and idle > self.settings.idle_timeout:
                    self.close_in_background(session, f"idle for {idle:.0f} s")

    async def close(self, grace: float = 10.0) -> None:
        """Closes every session, disconnects every model, stops the executor.

        Generations are stopped, not cancelled: a step running in the executor cannot be
        interrupted, and its session must outlive it. Tasks still running after ``grace``
        seconds are cancelled.
        """
        for task in (self._reaper, self._loop_watch, self._accounting):
            if task is not None:
                task.cancel()
        self.warm.drain()
        for session in list(self._sessions):
            self.close_in_background(session, "server shutdown")
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                logger.warning("Task %s still running at shutdown, cancelling it", task.get_name())
                task.cancel()
        await self.registry.close()
        await self.accounts.close()
        self.monitor.close()
        self.executor.shutdown()
        self.tokenizer_pool.shutdown()
        self.grammars.shutdown()
        self.metrics.unwatch_gc()


def build_manager(models: Sequence[ModelSpec], initial_peers: Sequence[str], device: str, torch_dtype: str,
                  settings: Settings = Settings(),
                  refusals: Optional[Mapping[str, str]] = None) -> SessionManager:
    """A session manager and its collaborators, ready to ``start``; the ``refusals`` (a declared
    model's key: why it cannot be served) are not loaded, and requests naming them get the reason."""
    accounts = AccountBook(settings)
    adaptive = AdaptiveInFlight(settings.executor_workers) if settings.adapts_steps_in_flight else None
    executor = BlockingExecutor(settings.executor_workers, in_flight=settings.steps_in_flight_limit,
                                weight_of=accounts.weight_of, adaptive=adaptive)
    registry = ModelRegistry(models, resolve_initial_peers(initial_peers), device, torch_dtype, settings, executor,
                             refusals)
    admission = Admission(settings, key_session_limit=accounts.key_session_limit)
    metrics = SessionMetrics(open_sessions=lambda: admission.open_sessions,
                             executor_queue_depth=lambda: executor.queue_depth,
                             reserved_state_bytes=lambda: admission.reserved_bytes,
                             state_budget_bytes=admission.memory_budget)
    server_latency = ServerLatency(metrics.observe_server_step)
    grammars = GrammarCompiler()
    manager = SessionManager(registry, admission, executor, SwarmMonitor(registry), metrics, settings, accounts,
                             server_latency=server_latency,
                             grammars=grammars,
                             open_stream=functools.partial(TokenStream, observe_server_step=server_latency.observe,
                                                           grammars=grammars),
                             open_rows=functools.partial(RowsTokenStream, observe_server_step=server_latency.observe,
                                                         grammars=grammars))
    metrics.state_bytes.set_function(manager.session_state_bytes)
    metrics.warm_sessions.set_function(lambda: len(manager.warm))
    metrics.detached_sessions.set_function(lambda: manager.resumable.detached)
    metrics.steps_in_flight_limit.set_function(lambda: executor.in_flight)
    return manager
