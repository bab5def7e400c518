"""How many swarm steps may run at once on a swarm this server joined, found from how long they take.

The swarm's servers take steps first come, first served: steps sent beyond what the route can
work on at once wait in a server's queue, where the executor's fair turns no longer count, and
each takes longer than it would alone. Too few in flight leave the route's servers idle. The
limit is found the way TCP Vegas finds a congestion window: a step that started while no other
ran gives the time of a step alone (per model: routes differ); after every round of steps (as
many as the limit), the round's mean of time over that time says whether steps queue. Below
``1 + GROW_BELOW`` one more may run, above ``1 + SHRINK_ABOVE`` one fewer. On a route of one
server that settles at 2: one step running there and one on its way. So that the time alone
follows a route that changes, when a model has had no step alone for ``PROBE_SECONDS`` (or
none yet) the limit drops to one until one runs alone.
"""

import collections
import time
from typing import Callable, Deque, Dict, Hashable, List, Optional, Tuple

GROW_BELOW = 0.5  # a round this much slower than steps alone, or less, lets one more step run
SHRINK_ABOVE = 1.25  # a round this much slower than steps alone, or more, lets one fewer run
PROBE_SECONDS = 10.0  # the longest a model goes without a step alone before the limit lets one
BASE_SECONDS = 60.0  # steps alone older than this no longer count for the time of a step alone


class AdaptiveInFlight:
    """The limit on steps in flight (``current``), adjusted as the steps' times are observed.

    Not locked: its owner (the executor) calls it under its own lock.
    """

    def __init__(self, maximum: int, clock: Callable[[], float] = time.monotonic):
        self.maximum = maximum
        self.limit = min(2, maximum)  # where a route of one server settles
        self._clock = clock
        # Per model: (when, seconds) of steps alone, each shorter than every one before it that is
        # kept (a longer one cannot be the minimum while a later, shorter one is in the window),
        # so the first is the shortest and the last the latest: O(1) per step on average.
        self._alone: Dict[Hashable, Deque[Tuple[float, float]]] = {}
        self._probing: Optional[Hashable] = None  # the model whose time alone is due to be measured again
        self._round: List[float] = []  # this round's times over the time alone
        self._round_waited = False  # whether calls waited for a place during this round

    @property
    def current(self) -> int:
        """How many steps may run at once now (one while a step alone is awaited)."""
        return 1 if self._probing is not None else self.limit

    def time_alone(self, group: Hashable) -> Optional[float]:
        """The time of a step of ``group`` (a model) alone: the shortest of the recent ones."""
        samples = self._alone.get(group)
        if not samples:
            return None
        cutoff = self._clock() - BASE_SECONDS
        while len(samples) > 1 and samples[0][0] < cutoff:
            samples.popleft()
        return samples[0][1]

    def observe(self, group: Hashable, seconds: float, alone: bool, calls_waiting: bool) -> None:
        """A step of ``group`` took ``seconds``; ``alone``: no other call ran when it started;
        ``calls_waiting``: calls wait for a place now (the limit holds something back)."""
        now = self._clock()
        if alone:
            samples = self._alone.setdefault(group, collections.deque())
            while samples and samples[-1][1] >= seconds:
                samples.pop()
            samples.append((now, seconds))
            if self._probing == group:
                self._probing = None
            return
        samples = self._alone.get(group)
        if self._probing is None and (not samples or now - samples[-1][0] > PROBE_SECONDS):
            self._probing = group
        base = self.time_alone(group)
        if base is None or base <= 0:
            return
        self._round.append(seconds / base)
        self._round_waited = self._round_waited or calls_waiting
        if len(self._round) >= self.limit:
            slowdown = sum(self._round) / len(self._round) - 1
            if slowdown > SHRINK_ABOVE and self.limit > 1:
                self.limit -= 1
            elif slowdown < GROW_BELOW and self._round_waited and self.limit < self.maximum:
                self.limit += 1
            self._round, self._round_waited = [], False
