"""Resumable sessions' rules on fakes: tokens, grace periods, and the replay of missed replies."""

import json
from types import SimpleNamespace

import pytest

from handlers.replies import KEPT_AFTER_STOP, KEPT_REPLIES, ReplyChannel
from sessions.errors import ResumeRefused
from sessions.resumable import ResumableSessions


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
        await channel.deliver({"n": n})
    channel.detach()
    for n in range(3, 6):
        await channel.deliver({"n": n})
    channel.check_replayable(2)
    await channel.attach("b", send_second, last_seq=2)  # the client saw replies 1 and 2 only
    await channel.deliver({"n": 6})
    assert [reply["seq"] for reply in first] == [1, 2, 3]
    assert [(reply["seq"], reply["n"]) for reply in second] == [(3, 2), (4, 3), (5, 4), (6, 5), (7, 6)]
    assert channel.owner == "b"
    with pytest.raises(ResumeRefused):
        channel.check_replayable(8)  # never sent


async def test_a_detached_channel_stops_the_generation_before_its_buffer_overflows():
    stops = []
    channel = ReplyChannel(None, numbered=True, on_full=lambda: stops.append(channel.seq))
    channel.detach()
    for n in range(KEPT_REPLIES + 5):
        await channel.deliver({"n": n})
    assert stops == [KEPT_REPLIES - KEPT_AFTER_STOP]
    with pytest.raises(ResumeRefused):
        channel.check_replayable(0)  # the first replies are gone
    channel.check_replayable(6)


async def test_an_unnumbered_channel_sends_replies_as_they_are():
    sent = []

    async def send(frame):
        sent.append(frame)

    channel = ReplyChannel(send)
    await channel.deliver({"ok": True})
    assert sent == ['{"ok": true}'] and channel.seq == 0
