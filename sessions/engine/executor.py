"""The bounded thread pools that run every blocking Petals call and every tokenization.

One ``BlockingExecutor`` for the steps and the swarm's calls, and one ``TakingTurns`` for
tokenizing prompts, are built at start-up and handed to whoever needs them (the model registry,
the sessions), so nothing blocking ever runs on the event loop.
"""

import asyncio
import collections
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Counter, Deque, Dict, Tuple, TypeVar

T = TypeVar("T")

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
    """A fixed number of threads for blocking calls; ``queue_depth`` counts calls not yet started.
    ``background`` threads run at a lower CPU priority (``run_in_background``)."""

    def __init__(self, workers: int, name: str = "petals", background: bool = False):
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                                        initializer=run_in_background if background else None)
        self._waiting = 0
        self._lock = threading.Lock()

    @property
    def queue_depth(self) -> int:
        """Calls submitted and waiting for a free thread."""
        return self._waiting

    @property
    def saturated(self) -> bool:
        """Whether more calls wait for a thread than there are threads: work is piling up."""
        return self._waiting > self.workers

    def submit(self, function: Callable[..., T], *args) -> "Future[T]":
        """Queues ``function(*args)``; the returned concurrent future completes in a worker thread."""
        with self._lock:
            self._waiting += 1
        try:
            future = self._pool.submit(self._started, function, *args)
        except RuntimeError:  # shut down
            with self._lock:
                self._waiting -= 1
            raise
        future.add_done_callback(self._cancelled)
        return future

    def run(self, function: Callable[..., T], *args) -> "asyncio.Future[T]":
        """``submit`` as an asyncio future, to await on the event loop."""
        return asyncio.wrap_future(self.submit(function, *args))

    def _started(self, function: Callable[..., T], *args) -> T:
        with self._lock:
            self._waiting -= 1
        return function(*args)

    def _cancelled(self, future: "Future") -> None:
        if future.cancelled():  # cancelled while queued: it never started
            with self._lock:
                self._waiting -= 1

    def shutdown(self) -> None:
        """Drops queued calls; running ones finish in their threads."""
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
