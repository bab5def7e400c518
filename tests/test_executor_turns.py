"""The executor's turns between owners by weight: shares while backlogged, newcomers, no banked turns.

The calls block on events, and one thread (or one free place) starts them one at a time, so the
order of their starts is the scheduler's alone.
"""

import threading
from typing import Callable, List

from sessions.engine.executor import BlockingExecutor

WEIGHTS = {"heavy": 3.0, "light": 1.0}


def recording(order: List[str], gate: threading.Event) -> Callable[[str], None]:
    """A call that notes its start, then waits for ``gate``."""
    def call(name: str) -> None:
        order.append(name)
        gate.wait(5)
    return call


def test_backlogged_owners_take_turns_in_proportion_to_their_weights():
    pool = BlockingExecutor(1, "weighted", weight_of=lambda owner: WEIGHTS.get(owner, 1.0))
    gate, order = threading.Event(), []
    call = recording(order, gate)
    calls = [pool.submit(call, "blocker", owner="blocker")]  # holds the thread while both lines fill
    for index in range(40):
        calls += [pool.submit(call, "heavy", owner="heavy"), pool.submit(call, "light", owner="light")]
    gate.set()
    for future in calls:
        future.result(5)
    starts = order[1:41]
    assert abs(starts.count("heavy") - 30) <= 1 and abs(starts.count("light") - 10) <= 1
    # interleaved throughout, not one share after the other
    assert 4 <= starts[:20].count("light") <= 6
    pool.shutdown()


def test_a_newcomers_first_call_starts_before_a_backlogged_owners_next():
    pool = BlockingExecutor(1, "newcomer", weight_of=lambda owner: WEIGHTS.get(owner, 1.0))
    gate, order = threading.Event(), []
    newcomer = []

    def call(name: str) -> None:
        order.append(name)
        if name == "heavy-4":  # arrives mid-backlog, with the heavy owner's pass already ahead
            newcomer.append(pool.submit(recording(order, gate), "newcomer", owner="newcomer"))
        gate.wait(5)

    calls = [pool.submit(call, f"heavy-{index}", owner="heavy") for index in range(10)]
    gate.set()
    for future in calls + newcomer:
        future.result(5)
    assert order[4:7] == ["heavy-4", "newcomer", "heavy-5"]
    pool.shutdown()


def test_an_owner_back_from_idling_gets_no_burst_of_banked_turns():
    # Two places: the returning owner holds one with a long call all along (so it is not
    # forgotten and keeps its early pass), while the other owner's calls take the other in turn.
    pool = BlockingExecutor(2, "idle")
    gate, long_call, order = threading.Event(), threading.Event(), []
    returning = []

    def call(name: str) -> None:
        order.append(name)
        if name == "busy-10":  # the returning owner's pass lags ten turns behind by now
            returning.extend(pool.submit(recording(order, gate), f"back-{index}", owner="back") for index in range(4))
        gate.wait(5)

    held = pool.submit(long_call.wait, 5, owner="back")
    calls = [pool.submit(call, f"busy-{index}", owner="busy") for index in range(16)]
    gate.set()
    for future in calls + returning:
        future.result(5)
    long_call.set()
    held.result(5)
    assert order[10:18] == ["busy-10", "back-0", "busy-11", "back-1", "busy-12", "back-2", "busy-13", "back-3"]
    pool.shutdown()


def test_a_weight_changed_at_run_time_counts_from_the_next_turn():
    weights = {"a": 1.0, "b": 1.0}
    pool = BlockingExecutor(1, "reweighted", weight_of=weights.__getitem__)
    gate, order = threading.Event(), []

    def call(name: str) -> None:
        order.append(name)
        if len(order) == 11:
            weights["a"] = 3.0
        gate.wait(5)

    calls = [pool.submit(call, "blocker", owner="blocker")]
    for _ in range(30):
        calls += [pool.submit(call, "a", owner="a"), pool.submit(call, "b", owner="b")]
    gate.set()
    for future in calls:
        future.result(5)
    assert order[1:11].count("a") == 5  # alternating at first
    assert abs(order[11:31].count("a") - 15) <= 1  # then three to one
    pool.shutdown()


def test_a_faulty_weight_counts_as_one(caplog):
    def weight_of(owner: str) -> float:
        if owner == "broken":
            raise KeyError(owner)
        return -1.0 if owner == "negative" else 1.0

    pool = BlockingExecutor(1, "faulty", weight_of=weight_of)
    gate, order = threading.Event(), []
    call = recording(order, gate)
    calls = [pool.submit(call, "blocker", owner="blocker")]
    for _ in range(3):
        calls += [pool.submit(call, owner, owner=owner) for owner in ("broken", "negative", "fine")]
    gate.set()
    for future in calls:
        future.result(5)
    assert order[1:] == ["broken", "negative", "fine"] * 3
    assert "could not be read" in caplog.text and "not a positive number" in caplog.text
    pool.shutdown()
