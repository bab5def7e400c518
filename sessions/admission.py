"""Admission control: every limit on what clients may hold or ask for, in one place.

Per server (open sessions, the memory their client-side state may take, and WebSocket
connections in all), per client (those of one client),
per connection (messages per second, generations waiting in its session) and per request
(``max_length``, ``max_new_tokens``, stop sequences and text length against the model's limits). At a limit a request is
refused at once with an error that names it; nothing waits in a queue.
"""

import collections
import time
from typing import Callable, Counter

from config import MIB, ManagerSettings, ModelSpec
from sessions.errors import (
    ClientLimit,
    InvalidRequest,
    MaxLengthExceeded,
    MemoryBudgetExceeded,
    QueueFull,
    RateLimited,
    ServerBusy,
    TooManyConnections,
)
from sessions.requests import GenerationRequest

# Generations one session may hold waiting behind its running one.
MAX_WAITING_GENERATIONS = 4
# Stop sequences of one generation, and the length of each: every generated character is
# checked against each of them.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 1000


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
    """How many of a thing are held, in all and per client, and the memory they reserve."""

    def __init__(self):
        self.total = 0
        self.reserved_bytes = 0
        self.by_client: Counter[str] = collections.Counter()

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


class MessageRate:
    """A token bucket: ``per_second`` messages on average, bursts of twice that."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic):
        self.per_second = per_second
        self.burst = 2 * per_second
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def check(self) -> None:
        """Takes one message's token, or raises ``RateLimited``."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens < 1:
            raise RateLimited(f"Too many messages: at most {self.per_second:g} per second; this one was dropped")
        self._tokens -= 1


class Admission:
    """Counts open sessions and connections, per server and per client, and checks requests
    against the limits."""

    def __init__(self, settings: ManagerSettings):
        self.settings = settings
        self.memory_budget = settings.session_memory_budget_bytes
        self._sessions = _Tally()
        self._connections = _Tally()

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
        if self._sessions.by_client[client] >= self.settings.max_sessions_per_client:
            raise ClientLimit(f"This client already holds {self.settings.max_sessions_per_client} sessions, "
                              "the most one client may; close one first")

    def admit(self, client: str, reserved_bytes: int = 0) -> Slot:
        """Takes a session's place for ``client``, reserving ``reserved_bytes`` of the memory
        budget, or raises if a limit is reached."""
        self.check_capacity(client)
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

    def message_rate(self) -> MessageRate:
        """A new connection's message budget."""
        return MessageRate(self.settings.max_messages_per_second)

    @staticmethod
    def check_session_length(spec: ModelSpec, max_length: int) -> None:
        """Raises if a session of ``max_length`` tokens is longer than the model allows."""
        limit = spec.chat.max_session_length
        if max_length > limit:
            raise InvalidRequest(f"max_length {max_length} exceeds this model's maximum session length {limit}")

    @staticmethod
    def check_text_length(text: str, max_tokens: int, max_token_chars: int) -> None:
        """Raises if ``text`` cannot be ``max_tokens`` tokens or fewer: checked before tokenizing it."""
        if len(text) > max_tokens * max_token_chars:
            raise MaxLengthExceeded(f"Maximum length exceeded: {len(text)} characters are more than "
                                    f"{max_tokens} tokens of this model can hold")

    @staticmethod
    def check_request(spec: ModelSpec, request: GenerationRequest) -> None:
        """Raises if one generation asks for more new tokens or stop sequences than allowed."""
        limit = spec.max_new_tokens_limit
        if request.max_new_tokens is not None and request.max_new_tokens > limit:
            raise InvalidRequest(f"max_new_tokens {request.max_new_tokens} exceeds this model's limit of {limit}")
        stops = request.stop_sequences
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"{len(stops)} stop sequences given; at most {MAX_STOP_SEQUENCES} are allowed")
        if any(len(stop) > MAX_STOP_SEQUENCE_CHARS for stop in stops):
            raise InvalidRequest(f"A stop sequence may be at most {MAX_STOP_SEQUENCE_CHARS} characters long")

    @staticmethod
    def check_waiting(unfinished_generations: int) -> None:
        """Raises if a session with this many generations running or waiting may not queue another."""
        if unfinished_generations > MAX_WAITING_GENERATIONS:  # one runs, the rest wait
            raise QueueFull(f"This session already runs a generation and has {MAX_WAITING_GENERATIONS} waiting; "
                            "wait for a final reply (stop: true) before sending more")
