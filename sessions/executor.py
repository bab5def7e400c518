"""The bounded thread pool that runs every blocking Petals call and every tokenization.

One instance is built at start-up and handed to whoever needs it (the model registry, the
sessions), so nothing blocking ever runs on the event loop.
"""

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class BlockingExecutor:
    """A fixed number of threads for blocking calls; ``queue_depth`` counts calls not yet started."""

    def __init__(self, workers: int, name: str = "petals"):
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
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
