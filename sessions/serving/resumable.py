"""Resumable sessions: a WebSocket session that outlives its connection for a grace period.

A client that asks for it when opening a session gets the session's id and a resume token (a
random secret, kept here only as a hash). When the connection drops, the session stays open,
its generations go on and its place in the client's limits stays taken; a new connection that
brings the id and the token within the grace period continues it. Whatever the connection layer
needs to carry across (its buffer of replies) travels as ``attachment``, opaque here.
"""

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from sessions.errors import ResumeRefused

TOKEN_BYTES = 32


@dataclass
class _Resumable:
    session: Any  # a ChatSession
    token_hash: bytes
    attachment: Any
    detached_at: Optional[float] = None  # when its connection dropped; None while one holds it
    resuming: bool = False  # a connection is taking it over (between ``resume`` and ``resumed``)


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class ResumableSessions:
    """The resumable sessions by id, and since when each has had no connection."""

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic):
        self.grace = grace
        self._clock = clock
        self._by_id: Dict[str, _Resumable] = {}

    @property
    def detached(self) -> int:
        """Sessions waiting for their client to come back."""
        return sum(entry.detached_at is not None for entry in self._by_id.values())

    def register(self, session: Any, attachment: Any) -> str:
        """Makes ``session`` resumable; returns its resume token (shown to its client only)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self._by_id[session.session_id] = _Resumable(session, _hash(token), attachment)
        return token

    def detach(self, session: Any) -> None:
        """The session's connection dropped: its grace period starts."""
        entry = self._by_id.get(session.session_id)
        if entry is not None and entry.session is session:
            entry.detached_at = self._clock()

    def resume(self, session_id: object, token: object, check: Callable[[Any], None] = lambda attachment: None
               ) -> Tuple[Any, Any]:
        """The session and attachment for ``session_id`` when ``token`` is its resume token and
        ``check(attachment)`` does not raise; ``ResumeRefused`` otherwise (a wrong token and an
        unknown id are refused alike, and so is a second resume while one is under way).

        The caller takes the session over at once and calls ``resumed`` once it has."""
        entry = self._by_id.get(session_id) if isinstance(session_id, str) else None
        valid = isinstance(token, str) and entry is not None and hmac.compare_digest(_hash(token), entry.token_hash)
        if not valid or entry.session.closed_reason is not None or self._expired(entry, self._clock()):
            raise ResumeRefused("No resumable session with this id and resume token; it may have closed or "
                                "waited past its grace period. Open a new session")
        if entry.resuming:
            raise ResumeRefused("Another connection is resuming this session")
        check(entry.attachment)
        entry.detached_at, entry.resuming = None, True
        return entry.session, entry.attachment

    def resumed(self, session: Any) -> None:
        """The connection that resumed ``session`` holds it: a later resume may take it over."""
        entry = self._by_id.get(session.session_id)
        if entry is not None and entry.session is session:
            entry.resuming = False

    def forget(self, session: Any) -> None:
        """The session closed: it can no longer be resumed."""
        entry = self._by_id.get(session.session_id)
        if entry is not None and entry.session is session:
            del self._by_id[session.session_id]

    def expired(self) -> List[Any]:
        """Removes and returns the sessions whose client did not come back within the grace period."""
        now = self._clock()
        gone = [session_id for session_id, entry in self._by_id.items() if self._expired(entry, now)]
        return [self._by_id.pop(session_id).session for session_id in gone]

    def _expired(self, entry: _Resumable, now: float) -> bool:
        return entry.detached_at is not None and now - entry.detached_at > self.grace
