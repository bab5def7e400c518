"""The chat session's logic against a fake token stream: tickets, stops, queueing, teardown, reaping,
its positions and the length rule.

Pure logic only; the same behaviours are proven on the real swarm in test_websocket.py,
test_manager.py and test_session_expiry.py.
"""

import asyncio
import gc
import os
import subprocess
import sys
import threading
import time

import pytest

from config import MIB, Settings
from sessions.accounts.limits import Account
from sessions.accounts.store import KeyLimits
from sessions.engine.executor import BACKGROUND_NICENESS, BlockingExecutor, TakingTurns
from sessions.engine.positions import SessionPositions
from sessions.engine.steps import ChosenToken, StepResult
from sessions.errors import (
    ClientLimit,
    InvalidRequest,
    MaxLengthExceeded,
    MemoryBudgetExceeded,
    PeerFailure,
    ServerBusy,
    SessionExpired,
    StepTimeout,
    SwarmCallFailed,
    error_payload,
)
from sessions.observe.metrics import SessionMetrics
from sessions.requests import GenerationRequest
from sessions.serving.admission import Admission
from sessions.serving.session import ChatSession
from tests.fakes import FakeModel, FakeTokenStream, fake_manager

STREAM = GenerationRequest(inputs="Hi", max_new_tokens=1, stop_sequence="never")


@pytest.fixture
def executor():
    pool = BlockingExecutor(2, "fake")
    yield pool
    pool.shutdown()


def make_session(executor, stream=None, step_timeout=10.0, max_length=256, admission=None, close_timeout=10.0,
                 draft_tokens=0, account=None):
    admission = admission or Admission(Settings())
    metrics = SessionMetrics(open_sessions=lambda: admission.open_sessions, executor_queue_depth=lambda: 0,
                             reserved_state_bytes=lambda: admission.reserved_bytes,
                             state_budget_bytes=admission.memory_budget)
    return ChatSession("s1", FakeModel(), stream or FakeTokenStream(), max_length, executor,
                       TakingTurns(1, "fake-tokenize"), step_timeout, metrics, admission.admit("client"),
                       account or Account("client", KeyLimits(), lambda *usage: None),
                       close_timeout=close_timeout, draft_tokens=draft_tokens)


async def collect(updates):
    return [update async for update in updates]


async def test_generations_wait_for_the_running_one(executor):
    session = make_session(executor, FakeTokenStream("abcdef", step_seconds=0.01))
    first = session.generate(GenerationRequest(inputs="x", max_new_tokens=3))
    second = session.generate(GenerationRequest(max_new_tokens=2))
    earlier, later = await asyncio.gather(collect(first), collect(second))
    assert [update.outputs for update in earlier] == ["abc"]
    assert [update.outputs for update in later] == ["de"]
    assert not session.has_generations
    await session.aclose("done")


async def test_stop_ends_the_running_and_the_waiting_generation_but_not_later_ones(executor):
    stream = FakeTokenStream("a" * 100, step_seconds=0.01)
    session = make_session(executor, stream)
    running, waiting = session.generate(STREAM), session.generate(STREAM)
    running_replies = []

    async def read_running():
        async for update in running:
            running_replies.append(update)
            if len(running_replies) == 3:
                session.cancel_generations()

    waiting_replies = (await asyncio.gather(read_running(), collect(waiting)))[1]
    assert running_replies[-1].finish_reason == "cancelled" and len(running_replies) == 4
    assert [(reply.finish_reason, reply.token_count) for reply in waiting_replies] == [("cancelled", 0)]
    after = await collect(session.generate(GenerationRequest(max_new_tokens=2)))
    assert after[-1].token_count == 2 and after[-1].finish_reason == "length"
    await session.aclose("done")


async def test_stop_sequences_spanning_tokens_are_held_back_and_cut(executor):
    session = make_session(executor, FakeTokenStream("Hello END more"))
    request = GenerationRequest(inputs="x", max_new_tokens=1, stop_sequence="END", visible_text=True)
    replies = await collect(session.generate(request))
    assert "".join(reply.outputs for reply in replies) == "Hello END"
    assert [reply.text for reply in replies if reply.text] == list("Hello ")
    assert replies[-1].stopped_by_sequence and replies[-1].finish_reason == "stop"
    held = [reply.text for reply in replies[6:]]
    assert held == ["", "", ""]  # "E", "N", "D": possibly the stop sequence, never shown
    await session.aclose("done")


async def test_close_waits_for_the_step_in_flight_then_releases_once(executor):
    admission = Admission(Settings())
    stream = FakeTokenStream("abc")
    session = make_session(executor, stream, admission=admission)
    stream.hold.clear()
    generation = asyncio.ensure_future(collect(session.generate(STREAM)))
    while not stream.steps_running:
        await asyncio.sleep(0.01)
    closing = asyncio.gather(session.aclose("first"), session.aclose("second"))
    await asyncio.sleep(0.1)
    assert not stream.closed and admission.open_sessions == 1  # the step is still running
    stream.hold.set()
    await closing
    assert stream.closed and not stream.closed_while_stepping
    assert admission.open_sessions == 0 and session.closed_reason == "first"
    assert (await generation)[-1].finish_reason == "cancelled"
    with pytest.raises(SessionExpired, match="expired"):
        await collect(session.generate(STREAM))


async def test_a_step_timeout_breaks_the_session_and_the_stream_closes_after_the_step(executor):
    stream = FakeTokenStream("abc")
    session = make_session(executor, stream, step_timeout=0.1)
    stream.hold.clear()
    with pytest.raises(StepTimeout):
        updates = session.generate(STREAM)
        asyncio.get_running_loop().call_later(0.5, stream.hold.set)
        await collect(updates)
    assert session.closed_reason == "failed: step_timeout" and session.released
    assert stream.closed and not stream.closed_while_stepping


class FailingStream(FakeTokenStream):
    """A stream whose step raises ``error``."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def step(self, new_input_ids=(), sampling=None, speculation=None) -> list:
        raise self.error


async def test_only_the_swarm_s_own_failures_are_swarm_errors(executor):
    # Our own code failing inside a step: an internal error that quotes nothing and is not retried.
    session = make_session(executor, FailingStream(RuntimeError("Inplace update to inference tensor")))
    with pytest.raises(RuntimeError) as raised:
        await collect(session.generate(STREAM))
    payload = error_payload(raised.value)
    assert payload["code"] == "internal_error" and not payload["retryable"]
    assert "Inplace" not in payload["traceback"]
    assert session.closed_reason == "failed: internal error"
    # The swarm failing: classified from petals' exception, retryable.
    failure = SwarmCallFailed()
    failure.__cause__ = ConnectionResetError("Connection reset by peer")
    session = make_session(executor, FailingStream(failure))
    with pytest.raises(PeerFailure):
        await collect(session.generate(STREAM))
    assert error_payload(PeerFailure("x"))["retryable"]


async def test_a_bad_request_keeps_the_session(executor):
    session = make_session(executor)
    with pytest.raises(InvalidRequest, match="inputs are required"):
        await collect(session.generate(GenerationRequest(max_new_tokens=1)))
    assert session.closed_reason is None
    assert (await collect(session.generate(GenerationRequest(inputs="x", max_new_tokens=1))))[-1].token_count == 1
    await session.aclose("done")


def test_admission_counts_per_server_and_per_client():
    admission = Admission(Settings(max_sessions=3, max_sessions_per_client=2))
    first, second = admission.admit("a"), admission.admit("a")
    with pytest.raises(ClientLimit):
        admission.admit("a")
    third = admission.admit("b")
    with pytest.raises(ServerBusy):
        admission.admit("c")
    first.release()
    first.release()  # a second release gives back nothing more
    assert admission.open_sessions == 2
    admission.admit("a")
    for slot in (second, third):
        slot.release()
    assert admission.open_sessions == 1


async def test_executor_queue_depth_counts_waiting_calls_only():
    pool = BlockingExecutor(1, "depth")
    stream = FakeTokenStream()
    stream.hold.clear()
    running = pool.run(stream.step, [1])
    queued = [pool.submit(stream.step, [1]) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert pool.queue_depth == 3
    queued[0].cancel()
    assert pool.queue_depth == 2
    stream.hold.set()
    await running
    await asyncio.gather(*(asyncio.wrap_future(future) for future in queued[1:]))
    assert pool.queue_depth == 0
    pool.shutdown()


async def test_the_reaper_closes_idle_sessions_only(executor):
    streams = []

    def open_stream(model, max_length):
        streams.append(FakeTokenStream("a" * 1000, step_seconds=0.01))
        return streams[-1]

    manager = fake_manager(executor, Settings(idle_timeout=0.3), open_stream)
    await manager.start()
    idle = await manager.open_session("idle", "fake", 64, "client")
    busy = await manager.open_session("busy", "fake", 256, "client")
    # 200 steps of 10 ms (no drafts: they would take the repeated "a"s many at a time).
    streaming = asyncio.ensure_future(collect(busy.generate(GenerationRequest(inputs="x", max_new_tokens=200,
                                                                              speculative=False))))
    await asyncio.sleep(1.5)
    assert idle.released and idle.closed_reason.startswith("idle for")
    assert not busy.released
    assert (await streaming)[-1].token_count == 200
    await manager.close(grace=2)
    assert busy.released and manager.open_session_count == 0


async def test_the_step_timeout_counts_from_the_start_of_the_step():
    single = BlockingExecutor(1, "one")
    blocker = FakeTokenStream()
    blocker.hold.clear()
    busy = single.run(blocker.step, [1])  # the only thread is taken for a while
    asyncio.get_running_loop().call_later(0.6, blocker.hold.set)
    session = make_session(single, FakeTokenStream("ab", step_seconds=0.1), step_timeout=0.4)
    replies = await collect(session.generate(GenerationRequest(inputs="x", max_new_tokens=2)))
    assert replies[-1].outputs == "ab"  # 0.6 s queued + 0.1 s running: no step ran 0.4 s
    await busy
    await session.aclose("done")
    single.shutdown()


async def test_closing_gives_the_place_back_even_when_the_swarm_hangs(executor):
    admission = Admission(Settings())
    hung_close = FakeTokenStream()
    hung_close.hold_close.clear()
    session = make_session(executor, hung_close, admission=admission, close_timeout=0.2)
    await session.aclose("hung release")
    assert admission.open_sessions == 0 and not hung_close.closed
    hung_close.hold_close.set()

    hung_step = FakeTokenStream()
    session = make_session(executor, hung_step, admission=admission, step_timeout=0.1, close_timeout=0.2)
    hung_step.hold.clear()
    with pytest.raises(StepTimeout):  # the step outlives its timeout and the close that follows
        await collect(session.generate(STREAM))
    assert admission.open_sessions == 0 and not hung_step.closed
    hung_step.hold.set()  # the step returns at last: only now is its swarm session closed
    for _ in range(100):
        if hung_step.closed:
            break
        await asyncio.sleep(0.01)
    assert hung_step.closed and not hung_step.closed_while_stepping


async def test_the_next_step_runs_while_a_reply_is_on_its_way_and_a_stop_discards_its_token(executor):
    stream = FakeTokenStream("abcdefgh", step_seconds=0.05)
    session = make_session(executor, stream)
    updates = session.generate(GenerationRequest(inputs="x", max_new_tokens=1, stop_sequence="never"))
    first = await updates.__anext__()
    await asyncio.sleep(0.03)
    assert stream.steps_running == 1  # the second token is on its way before anyone asked
    session.cancel_generations()
    rest = [update async for update in updates]
    assert first.outputs == "a" and [(update.outputs, update.finish_reason) for update in rest] == [("", "cancelled")]
    # "a" was fed by the step that ran ahead; its token "b" was never sent. New input drops it ...
    assert stream.pending == ord("b") and stream.fed == [ord("x"), ord("a")]
    again = await collect(session.generate(GenerationRequest(inputs="y", max_new_tokens=2)))
    assert again[-1].outputs == "bc" and stream.fed == [ord("x"), ord("a"), ord("y"), ord("b")]
    await session.aclose("done")


async def test_a_token_chosen_ahead_opens_the_next_generation_when_the_model_goes_on(executor):
    stream = FakeTokenStream("abcdefgh", step_seconds=0.05)
    session = make_session(executor, stream)
    updates = session.generate(GenerationRequest(inputs="x", max_new_tokens=1, stop_sequence="never"))
    assert (await updates.__anext__()).outputs == "a"
    session.cancel_generations()
    assert [update.finish_reason async for update in updates] == ["cancelled"]
    assert session.positions.carried.last.token == ord("b") == stream.pending  # kept by the session's positions
    # ... and going on without input starts from it, without a step for it.
    going_on = await collect(session.generate(GenerationRequest(max_new_tokens=3)))
    assert going_on[-1].outputs == "bcd" and stream.fed == [ord(char) for char in "xabc"]
    await session.aclose("done")


async def test_steps_go_on_in_the_worker_while_the_event_loop_is_busy_but_one_ahead_at_most(executor):
    stream = FakeTokenStream("abcdefgh", step_seconds=0.02)
    session = make_session(executor, stream)
    updates = session.generate(GenerationRequest(inputs="x", max_new_tokens=1, stop_sequence="never"))
    assert (await updates.__anext__()).outputs == "a"
    time.sleep(0.3)  # the event loop is held: only the worker can start steps now
    # "b" came without the loop; "c" was chosen, but nothing took "a"'s successor yet: no more.
    assert stream.fed == [ord(char) for char in "xab"] and stream.pending == ord("c")
    session.cancel_generations()
    rest = [update async for update in updates]
    # "b" was fed, so it is sent; "c" was not, and new input drops it.
    assert [(update.outputs, update.finish_reason) for update in rest] == [("b", "cancelled")]
    await collect(session.generate(GenerationRequest(inputs="y", max_new_tokens=1)))
    assert stream.fed == [ord(char) for char in "xaby"]
    await session.aclose("done")


async def test_a_generation_left_early_ends_its_steps_before_the_next_one_starts(executor):
    stream = FakeTokenStream("abcdefgh", step_seconds=0.05)
    session = make_session(executor, stream)
    updates = session.generate(GenerationRequest(inputs="x", max_new_tokens=1, stop_sequence="never"))
    assert (await updates.__anext__()).outputs == "a"
    await updates.aclose()  # the reader went away mid-stream: the step started ahead still runs
    assert not stream.steps_running
    # Its token was never fed: new input drops it, and no two steps ever ran at once.
    await collect(session.generate(GenerationRequest(inputs="y", max_new_tokens=1)))
    assert stream.fed == [ord(char) for char in "xay"]
    await session.aclose("done")


@pytest.mark.parametrize("reply, request_, fed", [
    ("abcdef", GenerationRequest(inputs="x", max_new_tokens=3), "xab"),
    ("Hello END more", GenerationRequest(inputs="x", max_new_tokens=1, stop_sequence="END"), "xHello EN"),
    ("ab", GenerationRequest(inputs="x", max_new_tokens=1, stop_sequence="never"), "xab"),
], ids=["max_new_tokens", "stop sequence", "end of sequence"])
async def test_a_generation_that_ends_starts_no_step_beyond_its_last_token(executor, reply, request_, fed):
    stream = FakeTokenStream(reply, step_seconds=0.005)
    session = make_session(executor, stream)
    replies = await collect(session.generate(request_))
    await asyncio.sleep(0.05)  # a step started ahead would have fed the last token by now
    assert replies[-1].finish_reason in ("length", "stop")
    assert stream.fed == [ord(char) for char in fed] and not stream.steps_running
    await session.aclose("done")


def positions_at(position: int, pending, max_length: int) -> SessionPositions:
    stream = FakeTokenStream()
    stream.position, stream.pending = position, pending
    return SessionPositions(stream, max_length)


def test_the_length_rule_counts_the_pending_token_and_the_client_s_max_length_leaves_room_for_one_more():
    positions = positions_at(5, ord("a"), max_length=8)  # 5 held, "a" to be fed: 6 with it
    assert positions.length_with([1, 2]) == 8
    assert positions.fits([1, 2]) and not positions.fits([1, 2, 3])  # the session holds what a step feeds
    assert positions.fits([1], 9) and not positions.fits([1, 2], 9)  # ... and the request the token it chooses
    assert positions.fits([], 7) and not positions.fits([1], 7)  # the lower of the two maxima counts
    assert not positions_at(8, ord("a"), max_length=8).fits([])
    assert positions_at(8, None, max_length=8).fits([])


def test_a_length_refusal_says_what_the_swarm_holds_what_comes_and_which_maximum():
    positions = positions_at(5, ord("a"), max_length=8)
    positions.check_step([1, 2])
    with pytest.raises(MaxLengthExceeded) as refused:
        positions.check_step([1, 2, 3])
    assert str(refused.value) == "Maximum length exceeded: prefix 5 + current 4 exceeds pre-allocated maximum 8"
    positions.check_input([1], 9)
    with pytest.raises(MaxLengthExceeded) as refused:
        positions.check_input([1, 2], 9)
    assert str(refused.value) == ("Maximum length exceeded: prefix 5 + current 3 leaves no room for a new token "
                                  "within the maximum 8")
    with pytest.raises(MaxLengthExceeded, match="within the maximum 6$"):
        positions.check_input([1], 6)
    positions.check_input([], 6)  # going on without input: the client's max_length ends the generation instead
    with pytest.raises(MaxLengthExceeded, match="prefix 8 \\+ current 1 leaves no room .* maximum 8$"):
        positions_at(8, ord("a"), max_length=8).check_input([], None)


def test_a_carried_token_opens_the_next_generation_unless_new_input_drops_it():
    stream = FakeTokenStream()
    stream.position, stream.pending = 3, ord("b")
    positions = SessionPositions(stream, max_length=16)
    chosen = StepResult((ChosenToken(ord("b"), "b"),))
    positions.carry(chosen)
    assert positions.take_carried([]) is chosen and positions.carried is None
    assert positions.take_carried([]) is None and positions.pending == ord("b")  # taken once only
    positions.carry(chosen)
    assert positions.take_carried([ord("y")]) is None
    assert positions.carried is None and positions.pending is None and positions.length_with([]) == 3
    positions.carry(StepResult((ChosenToken(ord("c"), "c"),)))
    stream.pending = ord("c")
    positions.discard_pending()  # a continuing request says what follows: both go
    assert positions.carried is None and positions.pending is None


async def test_a_generation_ends_at_the_client_s_max_length_and_fails_past_the_session_s(executor):
    stream = FakeTokenStream("abcdefghij")
    session = make_session(executor, stream, max_length=6)
    replies = await collect(session.generate(GenerationRequest(inputs="xy", max_new_tokens=10, max_length=5)))
    # "xy" and three tokens make 5: the third is chosen but, within max_length, never fed.
    assert replies[-1].outputs == "abc" and replies[-1].finish_reason == "length"
    assert stream.fed == [ord(char) for char in "xyab"]
    with pytest.raises(MaxLengthExceeded, match="^Maximum length exceeded: prefix 6 \\+ current 1 exceeds "
                                                "pre-allocated maximum 6$"):
        await collect(session.generate(GenerationRequest(max_new_tokens=10)))
    assert stream.fed == [ord(char) for char in "xyabcd"] and session.closed_reason is None
    with pytest.raises(MaxLengthExceeded, match="prefix 6 \\+ current 2 leaves no room"):
        await collect(session.generate(GenerationRequest(inputs="z", max_new_tokens=1)))
    await session.aclose("done")


def test_the_generation_loop_does_not_import_the_session():
    loaded = subprocess.run([sys.executable, "-c", "import sys, sessions.engine.generation; "
                             "print('sessions.serving.session' in sys.modules)"],
                            capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert loaded.stdout.strip() == "False"


def test_sessions_are_refused_past_the_memory_budget():
    admission = Admission(Settings(session_memory_budget_mib=1000 / MIB))
    first = admission.admit("a", reserved_bytes=600)
    with pytest.raises(MemoryBudgetExceeded, match="shorter max_length"):
        admission.admit("b", reserved_bytes=500)
    assert admission.open_sessions == 1 and admission.reserved_bytes == 600
    first.reserve(300)
    second = admission.admit("b", reserved_bytes=500)
    assert admission.reserved_bytes == 800
    first.release()
    second.release()
    second.reserve(900)  # a released place reserves nothing
    assert admission.reserved_bytes == 0
    with pytest.raises(InvalidRequest, match="more than this server's"):  # no room would ever fit it
        admission.admit("c", reserved_bytes=1001)


async def test_a_session_reserves_its_length_on_every_span_of_its_route(executor):
    admission = Admission(Settings())
    stream = FakeTokenStream()
    stream.span_count = 3
    session = make_session(executor, stream, max_length=100, admission=admission)
    assert admission.reserved_bytes == 0  # make_session admits without a reservation
    await collect(session.generate(GenerationRequest(inputs="x", max_new_tokens=2)))
    assert admission.reserved_bytes == 100 * FakeModel.state_bytes_per_token * 3
    await session.aclose("done")
    assert admission.reserved_bytes == 0


def test_garbage_collections_are_timed_while_watched():
    admission = Admission(Settings())
    metrics = SessionMetrics(open_sessions=lambda: 0, executor_queue_depth=lambda: 0,
                             reserved_state_bytes=lambda: 0, state_budget_bytes=admission.memory_budget)

    def full_collections() -> float:
        return metrics.registry.get_sample_value("swarm_chat_gc_pause_seconds_count", {"generation": "2"}) or 0

    metrics.watch_gc()
    try:
        gc.collect()
        gc.collect()
        assert full_collections() == 2
        assert metrics.registry.get_sample_value("swarm_chat_gc_pause_seconds_sum", {"generation": "2"}) > 0
    finally:
        metrics.unwatch_gc()
    gc.collect()
    assert full_collections() == 2


async def test_the_event_loop_s_lag_is_measured_while_watched():
    metrics = SessionMetrics(open_sessions=lambda: 0, executor_queue_depth=lambda: 0,
                             reserved_state_bytes=lambda: 0, state_budget_bytes=0)
    watch = asyncio.ensure_future(metrics.watch_event_loop(interval=0.05))
    await asyncio.sleep(0.12)
    time.sleep(0.3)  # something holds the event loop
    await asyncio.sleep(0.12)
    watch.cancel()

    def sample(name: str, **labels) -> float:
        return metrics.registry.get_sample_value(f"swarm_chat_event_loop_lag_seconds_{name}", labels)

    assert sample("count") >= 3
    assert sample("bucket", le="0.1") == sample("count") - 1  # only one sample was late past 100 ms
    assert sample("sum") >= 0.2


async def test_clients_take_turns_for_the_tokenizer_however_many_calls_one_sends():
    pool = TakingTurns(1, "turns")
    started, release = [], threading.Event()

    def call(name: str) -> str:
        started.append(name)
        release.wait(5)
        return name

    flood = [pool.run("flooder", call, f"f{index}") for index in range(5)]
    await asyncio.sleep(0.05)  # f0 runs; f1 to f4 wait in the flooder's line
    polite = pool.run("polite", call, "p")
    assert pool.queue_depth == 5
    release.set()
    assert await polite == "p" and [await future for future in flood] == [f"f{index}" for index in range(5)]
    assert started == ["f0", "p", "f1", "f2", "f3", "f4"]  # the polite call came second, not sixth
    pool.shutdown()


async def test_tokenizer_threads_yield_the_cpu_to_the_event_loop_and_the_steps():
    pool = TakingTurns(1, "turns")

    def own_niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        assert await pool.run("client", own_niceness) == BACKGROUND_NICENESS > own_niceness()
    finally:
        pool.shutdown()


def test_executor_owners_take_turns_however_many_calls_one_queues():
    pool = BlockingExecutor(1, "turns")
    gate, order = threading.Event(), []

    def call(name):
        gate.wait(5)
        order.append(name)

    calls = [pool.submit(call, f"heavy-{index}", owner="heavy") for index in range(5)]
    calls.append(pool.submit(call, "light", owner="light"))
    gate.set()
    for future in calls:
        future.result(5)
    # heavy-0 was running when light came; light's one call goes before heavy's other four
    assert order == ["heavy-0", "light", "heavy-1", "heavy-2", "heavy-3", "heavy-4"]
    pool.shutdown()


def test_executor_runs_no_more_calls_at_once_than_in_flight():
    pool = BlockingExecutor(4, "capped", in_flight=2)
    lock, running, most = threading.Lock(), [0], [0]

    def call():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    for future in [pool.submit(call, owner=index % 3) for index in range(12)]:
        future.result(5)
    assert most[0] == 2 and pool.queue_depth == 0
    pool.shutdown()


def test_an_owner_whose_waiting_call_was_cancelled_gets_one_turn_for_its_next():
    pool = BlockingExecutor(1, "cancelled-turns")
    gate, order = threading.Event(), []

    def call(name):
        gate.wait(5)
        order.append(name)

    first = pool.submit(call, "heavy-0", owner="heavy")
    dropped = pool.submit(call, "light-dropped", owner="light")
    assert dropped.cancel() and pool.queue_depth == 0
    calls = [first] + [pool.submit(call, f"heavy-{index}", owner="heavy") for index in (1, 2)]
    calls.append(pool.submit(call, "light", owner="light"))
    gate.set()
    for future in calls:
        future.result(5)
    assert order == ["heavy-0", "light", "heavy-1", "heavy-2"]
    pool.shutdown()
