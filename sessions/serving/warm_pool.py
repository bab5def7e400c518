"""Prefix reuse: the sessions of finished stateless requests, kept warm for the request that continues them.

A stateless API (``/v1`` and ``/api/v1/generate``) gets a whole conversation with each request.
When a request ends normally its session may wait here a short while; a later request of the
same client for the same model takes the session whose fed tokens share the longest beginning
with its prompt, goes back to where they part (``swarm.rollback``) and feeds only the rest: a
regenerated or edited last turn reuses the conversation before it. Attention caches then hold
exactly the tokens kept, so the reply is the one a fresh session would give. A session whose
tokens part from the prompt early (fewer than ``MIN_PARTIAL_TOKENS`` shared) is not taken.

The pool is bounded by count (in all and per client), by the memory its sessions hold on this
machine, and by age: well under the swarm servers' own timeout for an idle session. Sessions the
pool lets go are returned to the caller, who closes them; the pool itself never blocks.
"""

import collections
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from config import WarmPoolLimits

# Fewer shared tokens than this are not worth going back for (unless the session fed no others).
MIN_PARTIAL_TOKENS = 16


@dataclass
class _Warm:
    session: Any  # a ChatSession
    fed: Tuple[int, ...]  # the tokens the swarm holds attention caches for
    parked_at: float


class WarmPool:
    """Finished sessions waiting for a request that continues them (oldest first).

    Sessions are ``ChatSession``-like: ``client``, ``model.spec.key``, ``max_length``,
    ``closed_reason`` and a ``stream`` with ``fed_token_ids()`` and ``state_bytes``.
    """

    def __init__(self, limits: WarmPoolLimits = WarmPoolLimits(), clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._warm: "collections.OrderedDict[int, _Warm]" = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether finished sessions are kept at all."""
        return self.limits.max_sessions > 0

    def __len__(self) -> int:
        return len(self._warm)

    def state_bytes(self) -> int:
        """Memory the waiting sessions hold on this machine."""
        return sum(warm.session.stream.state_bytes for warm in self._warm.values())

    def session_length(self, needed: int, model_limit: int) -> int:
        """How long to open a request's session that needs ``needed`` tokens: with room for the
        conversation's next turn when reuse is on."""
        if not self.enabled:
            return needed
        return min(model_limit, needed + self.limits.headroom_tokens)

    def park(self, session: Any) -> List[Any]:
        """Keeps ``session`` for a request that continues it; returns the sessions to close
        (``session`` itself when it cannot wait, or older ones it pushed out)."""
        if not self.enabled or session.closed_reason is not None:
            return [session]
        if session.stream.state_bytes > self.limits.max_state_bytes:
            return [session]
        self._warm[id(session)] = _Warm(session, tuple(session.stream.fed_token_ids()), self._clock())
        leaving = []
        while self._over_limits(session.client):
            leaving.append(self._pop_oldest(session.client if self._count(session.client) > self.limits.max_per_client
                                            else None))
        return leaving

    def take(self, client: str, model: str, prompt_ids: Sequence[int], needed_length: int) -> Tuple[Optional[Any], int]:
        """The waiting session of ``client`` on ``model`` that shares the longest beginning with
        ``prompt_ids`` (all its fed tokens, or at least ``MIN_PARTIAL_TOKENS``) and has room for
        ``needed_length`` tokens in all, and how many tokens they share (at most all but the
        prompt's last); ``(None, 0)`` if none does."""
        best: Optional[_Warm] = None
        best_shared = 0
        for key, warm in list(self._warm.items()):
            session = warm.session
            if session.closed_reason is not None:  # closed meanwhile (e.g. at shutdown)
                del self._warm[key]
                continue
            if session.client != client or session.model.spec.key != model or session.max_length < needed_length:
                continue
            shared = shared_length(warm.fed, prompt_ids[:-1])
            if (shared == len(warm.fed) or shared >= MIN_PARTIAL_TOKENS) and shared > best_shared:
                best, best_shared = warm, shared
        if best is None:
            return None, 0
        del self._warm[id(best.session)]
        return best.session, best_shared

    def expired(self) -> List[Any]:
        """Removes and returns the sessions that waited longer than ``max_age``."""
        now = self._clock()
        old = [key for key, warm in self._warm.items() if now - warm.parked_at > self.limits.max_age]
        return [self._warm.pop(key).session for key in old]

    def evict(self, client: Optional[str] = None) -> Optional[Any]:
        """Removes and returns the oldest waiting session (of ``client``, when given), to make room."""
        if not any(client is None or warm.session.client == client for warm in self._warm.values()):
            return None
        return self._pop_oldest(client)

    def drain(self) -> List[Any]:
        """Removes and returns every waiting session."""
        sessions = [warm.session for warm in self._warm.values()]
        self._warm.clear()
        return sessions

    def holds(self, client: str) -> bool:
        """Whether a session of ``client`` is waiting here."""
        return self._count(client) > 0

    def _count(self, client: str) -> int:
        return sum(warm.session.client == client for warm in self._warm.values())

    def _over_limits(self, client: str) -> bool:
        return (len(self._warm) > self.limits.max_sessions or self._count(client) > self.limits.max_per_client
                or self.state_bytes() > self.limits.max_state_bytes)

    def _pop_oldest(self, client: Optional[str]) -> Any:
        key = next(key for key, warm in self._warm.items() if client is None or warm.session.client == client)
        return self._warm.pop(key).session


def shared_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many tokens ``first`` and ``second`` begin with in common."""
    shared = 0
    for a, b in zip(first, second):
        if a != b:
            break
        shared += 1
    return shared
