"""Resumable sessions' rules on fakes: tokens, grace periods, and the replay of missed replies."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from handlers.connection import GenerateConnection
from handlers.native_replies import Done
from handlers.replies import KEPT_AFTER_STOP, KEPT_REPLIES, ReplyChannel
from sessions.engine.executor import BlockingExecutor
from sessions.errors import ResumeRefused
from sessions.serving.resumable import ResumableSessions
from tests.fakes import fake_manager


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_session(session_id="s1"):
    return SimpleNamespace(session_id=session_id, closed_reason=None)


def test_only_the_right_token_resumes_and_only_within_the_grace_period():
    clock = Clock()
    sessions = ResumableSessions(grace=10, clock=clock)
    session = fake_session()
    token = sessions.register(session, attachment="replies")
    assert token != sessions.register(fake_session("s2"), attachment=None)  # random, per session
    for session_id, wrong in (("s1", token + "x"), ("s1", None), ("nope", token), (["s1"], token)):
        with pytest.raises(ResumeRefused):
            sessions.resume(session_id, wrong)
    sessions.detach(session)
    clock.now = 9
    assert sessions.resume("s1", token) == (session, "replies")
    sessions.detach(session)
    clock.now = 20
    assert sessions.expired() == [session]
    with pytest.raises(ResumeRefused):
        sessions.resume("s1", token)


def test_a_failed_check_leaves_the_session_waiting():
    sessions = ResumableSessions(grace=10, clock=Clock())
    session = fake_session()
    token = sessions.register(session, attachment=None)
    sessions.detach(session)

    def refuse(attachment):
        raise ResumeRefused("gap")

    with pytest.raises(ResumeRefused):
        sessions.resume("s1", token, refuse)
    assert sessions.detached == 1
    session.closed_reason = "idle"
    with pytest.raises(ResumeRefused):
        sessions.resume("s1", token)


async def test_replies_missed_while_detached_are_replayed_in_order_then_live_ones_follow():
    first, second = [], []

    async def send_first(frame):
        first.append(json.loads(frame))

    async def send_second(frame):
        second.append(json.loads(frame))

    channel = ReplyChannel(send_first, owner="a", numbered=True)
    for n in range(3):
        await channel.deliver(Done(id=n))
    channel.detach()
    for n in range(3, 6):
        await channel.deliver(Done(id=n))
    channel.check_replayable(2)
    channel.take("b")
    await channel.attach(send_second, last_seq=2)  # the client saw replies 1 and 2 only
    await channel.deliver(Done(id=6))
    assert [reply["seq"] for reply in first] == [1, 2, 3]
    assert [(reply["seq"], reply["id"]) for reply in second] == [(3, 2), (4, 3), (5, 4), (6, 5), (7, 6)]
    assert channel.owner == "b"
    with pytest.raises(ResumeRefused):
        channel.check_replayable(8)  # never sent


async def test_a_detached_channel_stops_the_generation_before_its_buffer_overflows():
    stops = []
    channel = ReplyChannel(None, numbered=True, on_full=lambda: stops.append(channel.seq))
    channel.detach()
    for n in range(KEPT_REPLIES + 5):
        await channel.deliver(Done(id=n))
    assert stops == [KEPT_REPLIES - KEPT_AFTER_STOP]
    with pytest.raises(ResumeRefused):
        channel.check_replayable(0)  # the first replies are gone
    channel.check_replayable(6)


async def test_an_unnumbered_channel_sends_replies_as_they_are():
    sent = []

    async def send(frame):
        sent.append(frame)

    channel = ReplyChannel(send)
    await channel.deliver(Done())
    assert sent == ['{"ok": true}'] and channel.seq == 0


async def test_only_replies_kept_since_the_drop_count_towards_stopping_a_long_generation():
    stops = []

    async def send(frame):
        pass

    channel = ReplyChannel(send, owner="a", numbered=True, on_full=lambda: stops.append(channel.seq))
    for n in range(2 * KEPT_REPLIES):  # a long chat, its connection alive
        await channel.deliver(Done(id=n))
    channel.detach()
    for n in range(KEPT_REPLIES - KEPT_AFTER_STOP - 1):
        await channel.deliver(Done(id=n))
    assert stops == []  # the generation goes on while the client may come back for it
    await channel.deliver(Done(id=0))
    assert stops == [2 * KEPT_REPLIES + KEPT_REPLIES - KEPT_AFTER_STOP]


def test_a_second_resume_under_way_is_refused_until_the_first_holds_the_session():
    sessions = ResumableSessions(grace=10, clock=Clock())
    session = fake_session()
    token = sessions.register(session, attachment=None)
    assert sessions.resume("s1", token) == (session, None)
    with pytest.raises(ResumeRefused, match="Another connection"):
        sessions.resume("s1", token)
    sessions.resumed(session)
    assert sessions.resume("s1", token) == (session, None)  # a later takeover


class Recorder:
    """A connection's frames; ``gate`` holds every send until it is set."""

    def __init__(self, gated: bool = False):
        self.frames = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def send(self, frame: str) -> None:
        await self.gate.wait()
        self.frames.append(json.loads(frame))


async def test_a_resume_takes_the_session_at_once_so_a_late_close_of_the_old_connection_leaves_it():
    executor = BlockingExecutor(2, "fake")
    manager = fake_manager(executor)
    await manager.start()
    old, new, rival = Recorder(), Recorder(gated=True), Recorder()

    def connection(name, recorder):
        return GenerateConnection(name, manager, recorder.send, "client", trusted=True, max_message_bytes=65536)

    first = connection("old", old)
    await first.on_message(json.dumps({"type": "open_inference_session", "max_length": 64, "resumable": True}))
    while not old.frames:  # the open is answered by a task of its own
        await asyncio.sleep(0.01)
    session_id, token = old.frames[-1]["session_id"], old.frames[-1]["resume_token"]
    resume = json.dumps({"type": "resume_inference_session", "session_id": session_id, "resume_token": token,
                         "last_seq": 0})
    second = connection("new", new)
    resuming = asyncio.ensure_future(second.on_message(resume))
    await asyncio.sleep(0.05)  # the resume waits to write its reply
    third = connection("rival", rival)
    await third.on_message(resume)
    assert rival.frames[-1]["code"] == "resume_refused"  # one resume at a time
    first.close(by_client=True)  # the old connection's close arrives late, even a deliberate one
    new.gate.set()
    await resuming
    assert new.frames[0]["resumed"] is True
    session = second.session
    assert session.closed_reason is None and manager.resumable.detached == 0
    await second.on_message(json.dumps({"type": "generate", "inputs": "x", "max_new_tokens": 3}))
    while len(new.frames) < 2:
        await asyncio.sleep(0.01)
    assert new.frames[-1]["outputs"] == "hel" and new.frames[-1]["seq"] == 1
    await manager.close()
