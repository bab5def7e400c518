"""New sessions that wait for room on a full server, per client in fair order.

The room knows nothing of what room is: a waiter's ``try_admit`` either admits it or raises one of
the ``no_room`` exceptions, and the owner calls ``room_freed`` whenever a place is given back.
"""

import asyncio
import collections
import logging
from typing import Callable, Deque, List, Optional, Tuple, Type, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


class _Waiter:
    """One session waiting: its client, its position (0 once it left) and its offer of room."""

    __slots__ = ("client", "on_position", "position", "reported", "offer")

    def __init__(self, client: str, on_position: Callable[[int], None], offer: "asyncio.Future[None]"):
        self.client = client
        self.on_position = on_position
        self.position = 0
        self.reported = 0
        self.offer = offer  # resolved when it is this waiter's turn to try for room


class WaitingRoom:
    """New sessions that wait for room on a full server, per client in fair order.

    Room is offered to one waiter at a time: the first of the client whose last admission from the
    room came longest ago (a client that starts to wait joins the round after those already
    waiting), each client's own waiters first come, first served. A waiter admitted passes the
    offer on at once (more than one place may have been freed); one that finds no room keeps its
    place at the head until the next ``room_freed``. A newcomer tries for room itself only while
    nobody waits, so it never jumps the line. At most ``max_waiting`` wait, at most
    ``max_waiting_per_client`` of one client; past either, a newcomer is refused at once with
    ``full_error(message)``, and a waiter not admitted in time leaves with ``timeout_error(message)``.
    Used from the event loop only.
    """

    def __init__(self, max_waiting: int, max_waiting_per_client: int, no_room: Tuple[Type[BaseException], ...],
                 full_error: Callable[[str], BaseException], timeout_error: Callable[[str], BaseException]):
        self.max_waiting = max_waiting
        self.max_waiting_per_client = max_waiting_per_client
        self._no_room = no_room
        self._full_error = full_error
        self._timeout_error = timeout_error
        # Each client's waiters in arrival order, the clients in the order room is offered to them.
        self._lines: "collections.OrderedDict[str, Deque[_Waiter]]" = collections.OrderedDict()
        self._waiting = 0
        self._offered: Optional[_Waiter] = None  # offered room and yet to try for it

    @property
    def waiting(self) -> int:
        """Sessions waiting for room, all clients together."""
        return self._waiting

    def waiting_of(self, client: str) -> int:
        """Sessions of ``client`` waiting for room."""
        line = self._lines.get(client)
        return len(line) if line else 0

    def has_place(self, client: str) -> bool:
        """Whether a session of ``client`` would find a place in line now (neither bound reached)."""
        return self._waiting < self.max_waiting and self.waiting_of(client) < self.max_waiting_per_client

    async def wait_for_room(self, client: str, try_admit: Callable[[], T], timeout: float,
                            on_position: Callable[[int], None] = lambda position: None) -> T:
        """Calls ``try_admit()`` when it is this waiter's turn and returns its result.

        ``try_admit`` raises one of the ``no_room`` exceptions while there is no room; any other
        exception reaches the caller at once. ``on_position(position)`` is called on entry and at
        each change of the waiter's position (1: room is offered to it next). With ``timeout <= 0``,
        or a room that holds no waiters, nobody waits: ``try_admit``'s error is raised as it comes.
        """
        if timeout <= 0 or self.max_waiting <= 0 or self.max_waiting_per_client <= 0:
            return try_admit()
        if not self._waiting:
            try:
                return try_admit()
            except self._no_room:
                pass
        if self._waiting >= self.max_waiting:
            raise self._full_error(f"{self._waiting} sessions already wait for room on this server")
        if self.waiting_of(client) >= self.max_waiting_per_client:
            raise self._full_error(f"this client already has {self.waiting_of(client)} sessions waiting")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(client, on_position, loop.create_future())
        self._lines.setdefault(client, collections.deque()).append(waiter)
        self._waiting += 1
        self._update_positions()
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                while True:
                    await waiter.offer
                    try:
                        result = try_admit()
                    except self._no_room:
                        self._offered = None
                        waiter.offer = loop.create_future()  # keeps its place for the next room freed
                        continue
                    self._admitted(waiter)
                    return result
        except TimeoutError:
            if not deadline.expired():  # try_admit's own
                raise
            raise self._timeout_error(f"waited {timeout:g} s for room; the server is still full") from None
        finally:
            if waiter.position:  # left without being admitted: cancelled, timed out or refused
                self._leave(waiter)

    def room_freed(self) -> None:
        """Offers the room to the first waiter in fair order, unless one is offered it already
        (that one passes the offer on once admitted)."""
        if self._offered is None:
            self._offer_next()

    def _offer_next(self) -> None:
        self._offered = next(iter(self._lines.values()))[0] if self._lines else None
        if self._offered is not None and not self._offered.offer.done():  # else cancelled: it passes the offer on
            self._offered.offer.set_result(None)

    def _admitted(self, waiter: _Waiter) -> None:
        # The admitted client's turn is over: its next waiter goes to the end of the round.
        self._remove(waiter)
        if waiter.client in self._lines:
            self._lines.move_to_end(waiter.client)
        self._offer_next()
        self._update_positions()

    def _leave(self, waiter: _Waiter) -> None:
        self._remove(waiter)
        if self._offered is waiter:  # the room it was offered may still be free
            self._offer_next()
        self._update_positions()

    def _remove(self, waiter: _Waiter) -> None:
        line = self._lines[waiter.client]
        line.remove(waiter)
        if not line:
            del self._lines[waiter.client]
        self._waiting -= 1
        waiter.position = 0

    def _update_positions(self) -> None:
        # Room goes round the clients, one waiter of each per round: positions follow that order,
        # in one pass over the clients and their waiters.
        order: List[_Waiter] = []
        rounds = [iter(line) for line in self._lines.values()]
        while rounds:
            still_waiting = []
            for line in rounds:
                waiter = next(line, None)
                if waiter is not None:
                    order.append(waiter)
                    still_waiting.append(line)
            rounds = still_waiting
        for position, waiter in enumerate(order, 1):
            waiter.position = position
        # Reported after all are set: a callback that changes the room reports the new positions itself.
        for waiter in order:
            if waiter.position and waiter.position != waiter.reported:
                waiter.reported = waiter.position
                try:
                    waiter.on_position(waiter.position)
                except Exception:
                    logger.exception("reporting a waiting session's position failed")
