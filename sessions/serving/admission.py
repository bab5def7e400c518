"""Admission control: every limit on what clients may hold, in one place.

Per server (open sessions, the memory their client-side state may take, and WebSocket
connections in all), per client (those of one client) and per connection (messages per
second, generations waiting in its session); a request's own fields are checked by
``sessions.request_rules``. At a limit a request is refused at once with an error that names it,
except a new session on a full server, which the manager lets wait in its waiting room
(``session_released`` tells it when a place is given back). The other exception is what a
WebSocket client sends: past its message rate or its client's bytes per second it is not answered
but slowed (``Budget.delay``), the server reading its next message only once the budget allows.
"""

import collections
import time
from typing import Callable, Counter, Dict, Optional

from config import MIB, Settings
from sessions.errors import (
    ClientLimit,
    InvalidRequest,
    MemoryBudgetExceeded,
    QueueFull,
    ServerBusy,
    TooManyConnections,
    TooManyRequests,
)

# Generations one session may hold waiting behind its running one.
MAX_WAITING_GENERATIONS = 4
# A client whose HTTP requests keep being refused is read more slowly: this many refusals a
# second on average (bursts of twice that), then each of its requests waits its turn at that
# pace before it is read. A flood of refused requests then costs what a polite client costs.
REFUSALS_PER_SECOND = 5.0
# Requests of one client waiting so; a client with more has its next connections closed unread.
MAX_SLOWED_REQUESTS = 256
# Clients whose refusals are remembered (the least recently refused are forgotten first).
REMEMBERED_REFUSED_CLIENTS = 10_000


class Slot:
    """One admitted session's or connection's place in the counts, and the bytes of memory it
    reserves; ``release`` gives both back (once)."""

    def __init__(self, tally: "_Tally", client: str, reserved_bytes: int = 0):
        self.client = client
        self.reserved_bytes = reserved_bytes
        self._tally = tally
        self.released = False

    def reserve(self, reserved_bytes: int) -> None:
        """Changes the memory this place reserves (e.g. once a session's route is known)."""
        if not self.released:
            self._tally.reserved_bytes += reserved_bytes - self.reserved_bytes
            self.reserved_bytes = reserved_bytes

    def release(self) -> None:
        """Gives the place back; later calls do nothing."""
        if not self.released:
            self.released = True
            self._tally.give_back(self.client, self.reserved_bytes)


class _Tally:
    """How many of a thing are held, in all and per client, and the memory they reserve;
    ``on_released()`` runs whenever one is given back, ``on_last_released(client)`` when a
    client holds none any more."""

    def __init__(self, on_last_released: Callable[[str], None] = lambda client: None,
                 on_released: Callable[[], None] = lambda: None):
        self.total = 0
        self.reserved_bytes = 0
        self.by_client: Counter[str] = collections.Counter()
        self._on_last_released = on_last_released
        self._on_released = on_released

    def take(self, client: str, reserved_bytes: int = 0) -> Slot:
        self.total += 1
        self.reserved_bytes += reserved_bytes
        self.by_client[client] += 1
        return Slot(self, client, reserved_bytes)

    def give_back(self, client: str, reserved_bytes: int) -> None:
        self.total -= 1
        self.reserved_bytes -= reserved_bytes
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]
            self._on_last_released(client)
        self._on_released()


class Budget:
    """A token bucket that lends: ``per_second`` units on average, bursts of ``burst``; what is
    spent beyond the bucket is paid back by waiting."""

    def __init__(self, per_second: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def delay(self, cost: float = 1.0) -> float:
        """Spends ``cost`` units; returns the seconds to wait before acting on it (0 within the budget)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second) - cost
        self._last = now
        return max(0.0, -self._tokens / self.per_second)

    @property
    def in_debt(self) -> bool:
        """Whether more was spent than the budget has given back so far."""
        return self._tokens + (self._clock() - self._last) * self.per_second < 0


class Admission:
    """Counts open sessions and connections, per server and per client, and checks requests
    against the limits."""

    def __init__(self, settings: Settings, key_session_limit: Callable[[str], Optional[int]] = lambda client: None):
        self.settings = settings
        self.key_session_limit = key_session_limit  # a client's own limit on sessions, if its key has one
        self.memory_budget = settings.session_memory_budget_bytes
        self.session_released: Callable[[], None] = lambda: None  # told whenever a session's place is given back
        self._sessions = _Tally(on_released=lambda: self.session_released())
        self._connections = _Tally(on_last_released=self._forget_received)
        self._requests = _Tally()
        self._received: Dict[str, Budget] = {}  # bytes per second, per client with connections
        self._refusals: "collections.OrderedDict[str, Budget]" = collections.OrderedDict()
        self._slowed = _Tally()  # HTTP requests waiting for their client's turn

    def session_limit(self, client: str) -> int:
        """The sessions (and HTTP requests in flight) ``client`` may hold: its key's limit, else
        ``--max-sessions-per-client``."""
        return self.key_session_limit(client) or self.settings.max_sessions_per_client

    @property
    def open_sessions(self) -> int:
        """Sessions admitted and not yet released."""
        return self._sessions.total

    @property
    def reserved_bytes(self) -> int:
        """Memory the open sessions' client-side state may grow to."""
        return self._sessions.reserved_bytes

    @property
    def open_connections(self) -> int:
        """WebSocket connections admitted and not yet closed."""
        return self._connections.total

    def check_capacity(self, client: str) -> None:
        """Raises if ``client`` may not open another session now."""
        if self._sessions.total >= self.settings.max_sessions:
            raise ServerBusy(f"This server holds its maximum of {self.settings.max_sessions} sessions; "
                             "try again shortly")
        limit = self.session_limit(client)
        if self._sessions.by_client[client] >= limit:
            raise ClientLimit(f"This client already holds {limit} sessions, the most one client may; close one first")

    def admit(self, client: str, reserved_bytes: int = 0) -> Slot:
        """Takes a session's place for ``client``, reserving ``reserved_bytes`` of the memory
        budget, or raises if a limit is reached."""
        self.check_capacity(client)
        if reserved_bytes > self.memory_budget:  # no wait for room would let it in
            raise InvalidRequest(f"A session of this length needs {reserved_bytes / MIB:.1f} MiB for its state, more "
                                 f"than this server's {self.memory_budget / MIB:.0f} MiB for all sessions; "
                                 "ask for a shorter max_length")
        if self._sessions.reserved_bytes + reserved_bytes > self.memory_budget:
            raise MemoryBudgetExceeded(
                f"Open sessions hold {self._sessions.reserved_bytes / MIB:.0f} MiB of this server's "
                f"{self.memory_budget / MIB:.0f} MiB for session state; a session of this length needs "
                f"{reserved_bytes / MIB:.1f} MiB more. Try a shorter max_length or try again later")
        return self._sessions.take(client, reserved_bytes)

    def admit_connection(self, client: str) -> Slot:
        """Takes a WebSocket connection's place for ``client``, or raises ``TooManyConnections``."""
        if self._connections.total >= self.settings.max_connections:
            raise TooManyConnections(f"This server holds its maximum of {self.settings.max_connections} "
                                     "connections; try again shortly")
        if self._connections.by_client[client] >= self.settings.max_connections_per_client:
            raise TooManyConnections(f"This client already holds {self.settings.max_connections_per_client} "
                                     "connections, the most one client may; close one first")
        return self._connections.take(client)

    def admit_request(self, client: str) -> Slot:
        """Takes the place of one HTTP generation request of ``client``, from before its body is read
        until its reply is written (as many as the sessions one client may hold), or raises
        ``TooManyRequests``: a request still being read or tokenized holds no session yet."""
        limit = self.session_limit(client)
        if self._requests.by_client[client] >= limit:
            raise TooManyRequests(f"This client already has {limit} requests in flight, the most one client may; "
                                  "wait for a reply first")
        return self._requests.take(client)

    def refused(self, client: str) -> None:
        """Notes that a request of ``client`` was refused (a 4xx answer)."""
        budget = self._refusals.pop(client, None) or Budget(REFUSALS_PER_SECOND, 2 * REFUSALS_PER_SECOND)
        self._refusals[client] = budget
        budget.delay()
        if len(self._refusals) > REMEMBERED_REFUSED_CLIENTS:
            self._refusals.popitem(last=False)

    def refusal_wait(self, client: str) -> Optional[float]:
        """How long a new request of ``client`` waits before it is read: 0 unless the client was
        refused more often than ``REFUSALS_PER_SECOND``, then its turn at that pace; None when
        the client already has ``MAX_SLOWED_REQUESTS`` waiting (close the connection unread)."""
        budget = self._refusals.get(client)
        if budget is None or not budget.in_debt:
            return 0.0
        if self._slowed.by_client[client] >= MAX_SLOWED_REQUESTS:
            return None
        return budget.delay()

    def slowed(self, client: str) -> Slot:
        """Counts a request of ``client`` as waiting its turn until the slot is released."""
        return self._slowed.take(client)

    def message_rate(self) -> Budget:
        """A new connection's message budget: the rate on average, bursts of twice that."""
        rate = self.settings.max_messages_per_second
        return Budget(rate, 2 * rate)

    def received_bytes(self, client: str) -> Budget:
        """The bytes per second all WebSocket connections of ``client`` may send together (bursts
        of a second's worth); kept while the client has a connection."""
        budget = self._received.get(client)
        if budget is None:
            rate = self.settings.max_client_bytes_per_second
            budget = self._received[client] = Budget(rate, rate)
        return budget

    def _forget_received(self, client: str) -> None:
        self._received.pop(client, None)

    @staticmethod
    def check_waiting(unfinished_generations: int) -> None:
        """Raises if a session with this many generations running or waiting may not queue another."""
        if unfinished_generations > MAX_WAITING_GENERATIONS:  # one runs, the rest wait
            raise QueueFull(f"This session already runs a generation and has {MAX_WAITING_GENERATIONS} waiting; "
                            "wait for a final reply (stop: true) before sending more")
