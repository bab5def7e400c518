"""The waiting room: fair order between clients, positions, its bounds, timeouts and leaving."""

import asyncio
from typing import Callable, Dict, List

import pytest

from sessions.errors import MemoryBudgetExceeded, ServerBusy
from sessions.serving.waiting_room import WaitingRoom


class RoomFull(Exception):
    """What the tests' room raises when no more may wait."""


class WaitedTooLong(Exception):
    """What the tests' room raises when a waiter's time is up."""


def make_room(max_waiting: int = 10, max_waiting_per_client: int = 5) -> WaitingRoom:
    return WaitingRoom(max_waiting, max_waiting_per_client, no_room=(ServerBusy, MemoryBudgetExceeded),
                       full_error=RoomFull, timeout_error=WaitedTooLong)


class Server:
    """A server's places for sessions: a waiter's ``try_admit`` takes one, or finds none."""

    def __init__(self, room: WaitingRoom, free: int = 0):
        self.room = room
        self.free = free
        self.admitted: List[str] = []
        self.tries: Dict[str, int] = {}
        self.positions: Dict[str, List[int]] = {}

    def try_admit(self, name: str) -> Callable[[], str]:
        def take_a_place() -> str:
            self.tries[name] = self.tries.get(name, 0) + 1
            if self.free <= 0:
                raise ServerBusy("the server holds its maximum of sessions")
            self.free -= 1
            self.admitted.append(name)
            return name
        return take_a_place

    def wait(self, client: str, name: str, timeout: float = 10.0) -> "asyncio.Task[str]":
        self.positions[name] = []
        return asyncio.ensure_future(self.room.wait_for_room(client, self.try_admit(name), timeout,
                                                             self.positions[name].append))

    def give_back(self, places: int = 1) -> None:
        self.free += places
        self.room.room_freed()


async def settle() -> None:
    """Lets every waiter woken run (each admission passes the offer on in a loop iteration of its own)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def queue(server: Server, *waiters: str) -> List["asyncio.Task[str]"]:
    """Starts ``client-index`` waiters in this order, each in the room before the next comes."""
    tasks = []
    for name in waiters:
        tasks.append(server.wait(name.split("-")[0], name))
        await settle()
    return tasks


async def test_room_goes_round_the_clients_and_each_clients_waiters_come_in_order():
    server = Server(make_room())
    tasks = await queue(server, "a-0", "a-1", "a-2", "a-3", "a-4", "b-0")
    for _ in tasks:
        server.give_back()
        await settle()
    assert await asyncio.gather(*tasks) == ["a-0", "a-1", "a-2", "a-3", "a-4", "b-0"]
    assert server.admitted == ["a-0", "b-0", "a-1", "a-2", "a-3", "a-4"]
    assert server.room.waiting == 0


async def test_positions_are_reported_on_entry_and_at_each_change_only():
    server = Server(make_room())
    tasks = await queue(server, "a-0", "a-1", "a-2", "b-0", "b-1")
    assert server.positions == {"a-0": [1], "a-1": [2, 3], "a-2": [3, 4, 5], "b-0": [2], "b-1": [4]}
    server.give_back()  # a-0 goes; b's turn comes before a's next
    await settle()
    assert server.positions == {"a-0": [1], "a-1": [2, 3, 2], "a-2": [3, 4, 5, 4], "b-0": [2, 1], "b-1": [4, 3]}
    server.give_back(4)
    await asyncio.gather(*tasks)
    assert server.admitted == ["a-0", "b-0", "a-1", "b-1", "a-2"]


async def test_a_full_room_and_a_client_at_its_bound_are_refused_at_once():
    server = Server(make_room(max_waiting=3, max_waiting_per_client=2))
    tasks = await queue(server, "a-0", "a-1")
    assert not server.room.has_place("a") and server.room.has_place("b")
    with pytest.raises(RoomFull, match="^this client already has 2 sessions waiting$"):
        await server.room.wait_for_room("a", server.try_admit("a-2"), 10.0)
    tasks += await queue(server, "b-0")
    assert not server.room.has_place("c")
    with pytest.raises(RoomFull, match="^3 sessions already wait for room on this server$"):
        await server.room.wait_for_room("c", server.try_admit("c-0"), 10.0)
    assert "a-2" not in server.tries and "c-0" not in server.tries  # refused without a try that would jump the line
    assert (server.room.waiting, server.room.waiting_of("a"), server.room.waiting_of("c")) == (3, 2, 0)
    server.give_back(3)
    await asyncio.gather(*tasks)


async def test_a_waiter_not_admitted_in_time_leaves_and_those_behind_move_up():
    server = Server(make_room())
    short = server.wait("a", "a-0", timeout=0.05)
    await settle()
    [behind] = await queue(server, "b-0")
    with pytest.raises(WaitedTooLong, match="^waited 0.05 s for room; the server is still full$"):
        await short
    assert server.positions["b-0"] == [2, 1] and server.room.waiting == 1
    server.give_back()
    assert await behind == "b-0"


async def test_a_cancelled_waiter_leaves_and_those_behind_move_up():
    server = Server(make_room())
    tasks = await queue(server, "a-0", "a-1", "a-2")
    tasks[0].cancel()
    await settle()
    assert tasks[0].cancelled() and server.room.waiting == 2
    assert server.positions["a-1"] == [2, 1] and server.positions["a-2"] == [3, 2]
    server.give_back(2)
    assert await asyncio.gather(*tasks[1:]) == ["a-1", "a-2"]
    assert server.tries["a-0"] == 1  # its try on arrival only


async def test_a_waiter_that_leaves_when_offered_room_passes_it_on():
    server = Server(make_room())
    tasks = await queue(server, "a-0", "b-0")
    server.give_back()  # offered to a-0, which leaves before it could try
    tasks[0].cancel()
    assert await tasks[1] == "b-0"
    assert server.tries["a-0"] == 1 and tasks[0].cancelled()


async def test_an_error_other_than_no_room_reaches_its_waiter_at_once_and_the_offer_passes_on():
    server = Server(make_room())

    def broken() -> str:
        raise ValueError("the model is gone")

    with pytest.raises(ValueError):  # on arrival, nobody waiting
        await server.room.wait_for_room("a", broken, 10.0)
    tasks = await queue(server, "b-0")
    failing = asyncio.ensure_future(server.room.wait_for_room("a", broken, 10.0))
    await settle()
    tasks += await queue(server, "c-0")
    server.room.room_freed()  # offered to b-0, which finds no room and keeps its place
    await settle()
    server.give_back()  # b-0 is admitted; a's error does not stop the offer from reaching c-0
    server.free += 1
    with pytest.raises(ValueError, match="the model is gone"):
        await failing
    assert await asyncio.gather(*tasks) == ["b-0", "c-0"]
    assert server.tries == {"b-0": 3, "c-0": 1}  # c-0 waited in line untried until then
    assert server.room.waiting == 0


async def test_a_newcomer_waits_in_line_while_others_wait_even_if_there_is_room():
    server = Server(make_room())
    tasks = await queue(server, "a-0")
    server.free = 1  # not yet announced by room_freed
    tasks += await queue(server, "b-0")
    assert server.tries == {"a-0": 1} and server.positions["b-0"] == [2]
    server.room.room_freed()
    await settle()
    assert server.admitted == ["a-0"] and server.tries == {"a-0": 2, "b-0": 1} and not tasks[1].done()
    server.give_back()
    assert await asyncio.gather(*tasks) == ["a-0", "b-0"]


async def test_room_freed_for_several_admits_as_many_and_the_next_keeps_its_place():
    server = Server(make_room())
    tasks = await queue(server, "a-0", "b-0", "c-0", "d-0")
    server.free = 2
    server.room.room_freed()
    server.room.room_freed()  # while the first offer is pending: adds nothing
    await settle()
    assert server.admitted == ["a-0", "b-0"]
    assert server.tries == {"a-0": 2, "b-0": 1, "c-0": 1} and server.positions["c-0"] == [3, 2, 1]
    server.give_back(2)
    assert await asyncio.gather(*tasks) == ["a-0", "b-0", "c-0", "d-0"]


async def test_each_no_room_error_keeps_a_waiter_waiting():
    room, tries = make_room(), []

    def try_admit() -> str:
        tries.append(len(tries))
        if len(tries) == 1:
            raise ServerBusy("no place")
        if len(tries) == 2:
            raise MemoryBudgetExceeded("no memory")
        return "admitted"

    waiting = asyncio.ensure_future(room.wait_for_room("a", try_admit, 10.0))
    await settle()
    room.room_freed()
    await settle()
    assert not waiting.done() and room.waiting == 1
    room.room_freed()
    assert await waiting == "admitted" and len(tries) == 3


@pytest.mark.parametrize("max_waiting, timeout", [(0, 10.0), (10, 0.0)])
async def test_without_waiting_no_room_is_raised_at_once(max_waiting, timeout):
    server = Server(WaitingRoom(max_waiting, 5, no_room=(ServerBusy,), full_error=RoomFull,
                                timeout_error=WaitedTooLong))
    with pytest.raises(ServerBusy):
        await server.room.wait_for_room("a", server.try_admit("a-0"), timeout)
    assert server.room.waiting == 0


async def test_a_failing_position_report_is_logged_and_the_waiter_still_served(caplog):
    room = make_room()

    def report(position: int) -> None:
        raise RuntimeError("the socket is closed")

    busy = [True]

    def try_admit() -> str:
        if busy[0]:
            raise ServerBusy("no place")
        return "admitted"

    waiting = asyncio.ensure_future(room.wait_for_room("a", try_admit, 10.0, report))
    await settle()
    busy[0] = False
    room.room_freed()
    assert await waiting == "admitted"
    assert "reporting a waiting session's position failed" in caplog.text


async def test_a_timeout_error_of_try_admit_is_its_own_not_the_rooms():
    room, tries = make_room(), []

    def try_admit() -> str:
        tries.append(len(tries))
        if len(tries) == 1:
            raise ServerBusy("no place")
        raise TimeoutError("the swarm did not answer")

    waiting = asyncio.ensure_future(room.wait_for_room("a", try_admit, 10.0))
    await settle()
    room.room_freed()
    with pytest.raises(TimeoutError, match="the swarm did not answer"):
        await waiting
    assert room.waiting == 0
