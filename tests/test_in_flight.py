"""The adaptive limit on steps in flight, against simple models of a swarm's queues; its effect on
a real local swarm is measured by bench/fairness.py."""

import pytest

from sessions.engine.executor import BlockingExecutor
from sessions.engine.in_flight import PROBE_SECONDS, AdaptiveInFlight

STEP = 0.01  # a swarm server's time for one step


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_route(limit: AdaptiveInFlight, clock: Clock, servers: int, steps: int, model: str = "m") -> list:
    """Steps through a route of ``servers`` servers of STEP each, always backlogged: with ``k`` in
    flight a step takes the route's time while the servers can hold them all, and queues beyond."""
    limit.observe(model, servers * STEP, alone=True, calls_waiting=False)
    seen = []
    for _ in range(steps):
        clock.now += STEP
        in_flight = limit.current
        limit.observe(model, max(servers, in_flight) * STEP, alone=False, calls_waiting=True)
        seen.append(limit.current)
    return seen


def test_on_a_route_of_one_server_it_settles_at_two():
    clock = Clock()
    limit = AdaptiveInFlight(16, clock)
    limit.limit = 8  # as if the default were still one per worker
    assert run_route(limit, clock, servers=1, steps=200)[-50:] == [2] * 50


def test_on_a_longer_route_it_grows_to_keep_every_server_busy_without_queueing_much():
    clock = Clock()
    limit = AdaptiveInFlight(32, clock)
    settled = run_route(limit, clock, servers=4, steps=400)[-100:]
    assert min(settled) >= 6 and max(settled) <= 9  # 1.5 to 2.25 times the route's servers


def test_it_grows_only_while_steps_wait_for_a_place_and_never_past_its_maximum():
    clock = Clock()
    limit = AdaptiveInFlight(3, clock)
    limit.observe("m", STEP, alone=True, calls_waiting=False)
    for _ in range(50):
        limit.observe("m", STEP, alone=False, calls_waiting=False)
    assert limit.current == 2  # nothing held back: no reason to grow
    for _ in range(50):
        limit.observe("m", STEP, alone=False, calls_waiting=True)
    assert limit.current == 3


def test_each_model_is_measured_against_its_own_steps_alone():
    clock = Clock()
    limit = AdaptiveInFlight(8, clock)
    limit.observe("fast", STEP, alone=True, calls_waiting=False)
    limit.observe("slow", 10 * STEP, alone=True, calls_waiting=False)
    for _ in range(40):
        limit.observe("slow", 10 * STEP, alone=False, calls_waiting=True)  # as fast as alone: no queue
    assert limit.current > 2


def test_without_a_recent_step_alone_the_limit_lets_one_run_alone():
    clock = Clock()
    limit = AdaptiveInFlight(8, clock)
    limit.observe("m", STEP, alone=True, calls_waiting=False)
    clock.now = PROBE_SECONDS + 1
    limit.observe("m", 2 * STEP, alone=False, calls_waiting=True)
    assert limit.current == 1
    limit.observe("m", STEP, alone=True, calls_waiting=True)
    assert limit.current == 2
    fresh = AdaptiveInFlight(8, clock)
    fresh.observe("new", STEP, alone=False, calls_waiting=True)  # never measured alone
    assert fresh.current == 1


def test_steps_alone_are_forgotten_after_a_while_so_the_time_alone_follows_the_route():
    clock = Clock()
    limit = AdaptiveInFlight(8, clock)
    limit.observe("m", STEP, alone=True, calls_waiting=False)
    clock.now = 100.0
    limit.observe("m", 3 * STEP, alone=True, calls_waiting=False)  # a slower route now
    assert limit.time_alone("m") == pytest.approx(3 * STEP)


def test_the_executor_runs_as_many_calls_as_the_limit_says():
    limit = AdaptiveInFlight(4)
    executor = BlockingExecutor(4, "adaptive", adaptive=limit)
    try:
        assert executor.in_flight == 2
        limit.limit = 3
        assert executor.in_flight == 3
        executor.step_done("m", STEP, alone=False)  # never alone: a step alone is asked for
        assert executor.in_flight == 1
        executor.step_done("m", STEP, alone=True)
        assert executor.in_flight == 3
    finally:
        executor.shutdown()
    fixed = BlockingExecutor(4, "fixed", in_flight=2)
    fixed.step_done("m", STEP, alone=False)
    assert fixed.in_flight == 2
    fixed.shutdown()
