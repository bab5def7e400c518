"""The bounded thread pools that run every blocking Petals call and every tokenization.

One ``BlockingExecutor`` for the steps and the swarm's calls, and one ``TakingTurns`` for
tokenizing prompts, are built at start-up and handed to whoever needs them (the model registry,
the sessions), so nothing blocking ever runs on the event loop.
"""

import asyncio
import collections
import heapq
import itertools
import logging
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Counter, Deque, Dict, Hashable, List, Optional, Tuple, TypeVar

from sessions.engine.in_flight import AdaptiveInFlight

T = TypeVar("T")

logger = logging.getLogger(__name__)

# The CPU niceness of threads that do work on a client's behalf before any swarm step (tokenizing
# prompts, compiling schemas): when the CPU is short, the event loop and the steps go first.
BACKGROUND_NICENESS = 10


def run_in_background() -> None:
    """Lowers the calling thread's CPU priority to ``BACKGROUND_NICENESS`` (Linux sets it per
    thread; elsewhere, or when refused, the thread keeps its priority)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):
        pass


class BlockingExecutor:
    """A fixed number of threads for blocking calls, shared out between their owners by weight.

    Each owner's calls (a client's swarm steps, say) wait in a line of their own, and the owners
    take turns by stride scheduling: each owner has a pass, and a free place takes the next call
    of the owner with the lowest pass (the earliest to arrive among equals), which then advances
    its pass by ``1 / weight_of(owner)``. Backlogged owners thus get turns in proportion to their
    weights (3:1 weights, three turns to one), and with equal weights they alternate. The virtual
    time is the pass of the turn started last: an owner that starts to wait again enters no
    earlier than it, so a newcomer never waits behind another owner's backlog and an owner that
    was idle has no turns banked. The weight is read as each turn starts, so it may change.

    At most ``in_flight`` calls run at once (by default one per thread), or as many as
    ``adaptive`` (an ``AdaptiveInFlight``) finds from the steps' times (``step_done``): the
    swarm's servers take steps first come, first served, so fewer steps in flight leave less of
    a queue there for the turns to be lost in. ``queue_depth`` counts calls not yet started. ``background`` threads
    run at a lower CPU priority (``run_in_background``). Thread-safe: calls come from the event
    loop and from worker threads (a step that starts the next one).
    """

    def __init__(self, workers: int, name: str = "petals", background: bool = False, in_flight: int = 0,
                 weight_of: Callable[[Hashable], float] = lambda owner: 1.0,
                 adaptive: Optional[AdaptiveInFlight] = None):
        self.workers = workers
        self.fixed_in_flight = min(in_flight, workers) if in_flight > 0 else workers
        self.adaptive = adaptive
        self.weight_of = weight_of
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                                        initializer=run_in_background if background else None)
        self._lines: Dict[Hashable, Deque[Tuple[Future, Callable, tuple]]] = {}  # owners with calls waiting
        # The owners with calls waiting, by the pass of their next turn, then their arrival:
        # (pass, arrival, owner). ``_queued`` holds each owner's current arrival; an entry left
        # behind (its calls were cancelled while they waited) is passed over.
        self._next_turns: List[Tuple[float, int, Hashable]] = []
        self._queued: Dict[Hashable, int] = {}
        self._running: Counter[Hashable] = collections.Counter()  # calls running, per owner
        self._running_total = 0
        self._passes: Dict[Hashable, float] = {}  # after their last turn, of owners with calls waiting or running
        self._virtual_time = 0.0  # the pass of the turn started last
        self._arrivals = itertools.count()
        self._waiting = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def queue_depth(self) -> int:
        """Calls submitted and waiting for their turn."""
        return self._waiting

    @property
    def in_flight(self) -> int:
        """How many calls may run at once now."""
        return self.adaptive.current if self.adaptive is not None else self.fixed_in_flight

    @property
    def saturated(self) -> bool:
        """Whether more calls wait for a thread than there are threads: work is piling up."""
        return self._waiting > self.workers

    def submit(self, function: Callable[..., T], *args, owner: Hashable = None) -> "Future[T]":
        """Queues ``function(*args)`` in ``owner``'s line; the returned concurrent future completes
        in a worker thread. ``RuntimeError`` once shut down."""
        future: "Future[T]" = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            line = self._lines.get(owner)
            if line is None:
                line = self._lines[owner] = collections.deque()
                self._queue_turn(owner)
            line.append((future, function, args))
            self._waiting += 1
            self._start_next()
        future.add_done_callback(lambda done: done.cancelled() and self._forget(owner, done))
        return future

    def run(self, function: Callable[..., T], *args, owner: Hashable = None) -> "asyncio.Future[T]":
        """``submit`` as an asyncio future, to await on the event loop."""
        return asyncio.wrap_future(self.submit(function, *args, owner=owner))

    def _queue_turn(self, owner: Hashable) -> None:
        # Under the lock: ``owner``, whose line is not empty, waits for its next turn, no earlier
        # than the virtual time (a newcomer, or an owner whose line ran empty, banks no turns).
        arrival = self._queued[owner] = next(self._arrivals)
        next_pass = max(self._passes.get(owner, 0.0), self._virtual_time)
        heapq.heappush(self._next_turns, (next_pass, arrival, owner))

    def _stride(self, owner: Hashable) -> float:
        # How far a turn advances ``owner``'s pass. A faulty weight must not stall every owner's
        # calls (this runs under the lock, in worker threads too): it counts as 1.
        try:
            weight = float(self.weight_of(owner))
        except Exception:
            logger.exception("the weight of %r could not be read; it counts as 1", owner)
            return 1.0
        if not (weight > 0 and math.isfinite(weight)):
            logger.error("the weight of %r is %r, not a positive number; it counts as 1", owner, weight)
            return 1.0
        return 1 / weight

    def _start_next(self) -> None:
        # Under the lock: while places are free, the owner with the lowest pass starts its next call.
        while self._running_total < self.in_flight and self._next_turns:
            turn_pass, arrival, owner = heapq.heappop(self._next_turns)
            if self._queued.get(owner) != arrival:  # left behind
                continue
            del self._queued[owner]
            line = self._lines[owner]
            future, function, args = line.popleft()
            self._waiting -= 1
            if not future.set_running_or_notify_cancel():  # cancelled as its turn came
                if line:
                    self._queue_turn(owner)
                else:
                    del self._lines[owner]
                    self._forget_if_idle(owner)
                continue
            self._virtual_time = turn_pass
            self._passes[owner] = turn_pass + self._stride(owner)
            self._running[owner] += 1
            self._running_total += 1
            if line:
                self._queue_turn(owner)  # its next call waits for the others' turns
            else:
                del self._lines[owner]
            self._pool.submit(self._call, owner, future, function, args)

    @property
    def running_alone(self) -> bool:
        """Whether the calling worker's call is the only one running (read as a step starts)."""
        return self._running_total == 1

    def step_done(self, model: Hashable, seconds: float, alone: bool) -> None:
        """A swarm step of ``model`` took ``seconds`` (``alone``: it started while no other call
        ran); an adaptive limit learns from it."""
        if self.adaptive is not None:
            with self._lock:
                self.adaptive.observe(model, seconds, alone, self._waiting > 0)
                if not self._closed:
                    self._start_next()  # the limit may have grown

    def _call(self, owner: Hashable, future: Future, function: Callable, args: tuple) -> None:
        try:
            result = function(*args)
        except BaseException as error:
            future.set_exception(error)
        else:
            future.set_result(result)
        finally:
            with self._lock:
                self._running[owner] -= 1
                self._running_total -= 1
                self._forget_if_idle(owner)
                if not self._closed:
                    self._start_next()

    def _forget(self, owner: Hashable, cancelled: Future) -> None:
        """A call cancelled while it waited leaves its line at once."""
        with self._lock:
            line = self._lines.get(owner, ())
            for call in line:
                if call[0] is cancelled:
                    line.remove(call)
                    self._waiting -= 1
                    if not line:
                        del self._lines[owner]
                        del self._queued[owner]
                        self._forget_if_idle(owner)
                    return

    def _forget_if_idle(self, owner: Hashable) -> None:
        if owner not in self._lines and not self._running[owner]:
            self._running.pop(owner, None)
            self._passes.pop(owner, None)

    def shutdown(self) -> None:
        """Drops queued calls; running ones finish in their threads."""
        with self._lock:
            self._closed = True
            waiting = [call[0] for line in self._lines.values() for call in line]
            self._lines.clear()
            self._next_turns.clear()
            self._queued.clear()
            self._waiting = 0
        for future in waiting:
            future.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


class TakingTurns:
    """Blocking calls of many clients in ``workers`` threads, taking turns between the clients.

    Each client's calls wait in a line of their own. A free thread takes the next call of the
    client with the fewest calls running, and among those of the one whose turn came longest ago
    (a newcomer's first): a client with many calls waiting delays another's by at most one of its
    own per thread, however many it sends. Its threads run at a lower CPU priority
    (``run_in_background``). Used from the event loop only (its bookkeeping is not locked).
    """

    def __init__(self, workers: int, name: str):
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=run_in_background)
        self._lines: Dict[str, Deque[Tuple[asyncio.Future, Callable, tuple]]] = {}  # clients with calls waiting
        self._running: Counter[str] = collections.Counter()  # calls running, per client
        self._last_turn: Dict[str, int] = {}  # when each client with calls waiting or running last had a turn
        self._turns = 0

    @property
    def queue_depth(self) -> int:
        """Calls waiting for a thread, all clients together."""
        return sum(len(line) for line in self._lines.values())

    def run(self, client: str, function: Callable[..., T], *args) -> "asyncio.Future[T]":
        """``function(*args)`` in a worker thread when ``client``'s turn comes; await its result."""
        future = asyncio.get_running_loop().create_future()
        self._lines.setdefault(client, collections.deque()).append((future, function, args))
        self._start_next()
        return future

    def _start_next(self) -> None:
        while sum(self._running.values()) < self.workers and self._lines:
            client = min(self._lines, key=lambda name: (self._running[name], self._last_turn.get(name, -1)))
            line = self._lines[client]
            future, function, args = line.popleft()
            if not line:
                del self._lines[client]
            if future.cancelled():  # its caller left before its turn
                self._forget_if_idle(client)
                continue
            try:
                job = self._pool.submit(function, *args)
            except RuntimeError as error:  # shut down
                future.set_exception(error)
                self._forget_if_idle(client)
                continue
            self._turns += 1
            self._last_turn[client] = self._turns
            self._running[client] += 1
            loop = asyncio.get_running_loop()
            job.add_done_callback(lambda job, future=future, client=client: loop.is_closed() or
                                  loop.call_soon_threadsafe(self._finished, client, job, future))

    def _finished(self, client: str, job: "Future", future: "asyncio.Future") -> None:
        self._running[client] -= 1
        if not self._running[client]:
            del self._running[client]
        self._forget_if_idle(client)
        if not future.done():
            if job.exception() is not None:
                future.set_exception(job.exception())
            else:
                future.set_result(job.result())
        self._start_next()

    def _forget_if_idle(self, client: str) -> None:
        if client not in self._lines and not self._running[client]:
            self._running.pop(client, None)
            self._last_turn.pop(client, None)

    def shutdown(self) -> None:
        """Drops waiting calls; running ones finish in their threads."""
        for line in self._lines.values():
            for future, _, _ in line:
                future.cancel()
        self._lines.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
