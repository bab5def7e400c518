"""Admission control: every limit on what clients may hold or ask for, in one place.

Per server (open sessions in all), per client (open sessions of one address) and per request
(``max_length`` and ``max_new_tokens`` against the model's limits). At a limit a request is
refused at once with an error that names it; nothing waits in a queue.
"""

import collections
from typing import Counter

from config import ManagerSettings, ModelSpec
from sessions.errors import ClientLimit, InvalidRequest, MaxLengthExceeded, QueueFull, ServerBusy
from sessions.requests import GenerationRequest

# Generations one session may hold waiting behind its running one.
MAX_WAITING_GENERATIONS = 4
# Stop sequences of one generation, and the length of each: every generated character is
# checked against each of them.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 1000


class SessionSlot:
    """One admitted session's place in the counts; ``release`` gives it back (once)."""

    def __init__(self, admission: "Admission", client: str):
        self.client = client
        self._admission = admission
        self.released = False

    def release(self) -> None:
        """Gives the place back; later calls do nothing."""
        if not self.released:
            self.released = True
            self._admission._give_back(self)


class Admission:
    """Counts open sessions per server and per client and checks requests against the limits."""

    def __init__(self, settings: ManagerSettings):
        self.settings = settings
        self.open_sessions = 0
        self._by_client: Counter[str] = collections.Counter()

    def check_capacity(self, client: str) -> None:
        """Raises if ``client`` may not open another session now."""
        if self.open_sessions >= self.settings.max_sessions:
            raise ServerBusy(f"This server holds its maximum of {self.settings.max_sessions} sessions; "
                             "try again shortly")
        if self._by_client[client] >= self.settings.max_sessions_per_client:
            raise ClientLimit(f"This client already holds {self.settings.max_sessions_per_client} sessions, "
                              "the most one client may; close one first")

    def admit(self, client: str) -> SessionSlot:
        """Takes a session's place for ``client``, or raises if a limit is reached."""
        self.check_capacity(client)
        self.open_sessions += 1
        self._by_client[client] += 1
        return SessionSlot(self, client)

    def _give_back(self, slot: SessionSlot) -> None:
        self.open_sessions -= 1
        self._by_client[slot.client] -= 1
        if not self._by_client[slot.client]:
            del self._by_client[slot.client]

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
