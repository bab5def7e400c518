"""The warm pool's rules, on fake sessions: which request continues which session, and its limits."""

from types import SimpleNamespace

from config import WarmPoolLimits
from sessions.serving.warm_pool import WarmPool


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def finished_session(fed, client="a", model="m", max_length=100, state_bytes=10):
    stream = SimpleNamespace(fed_token_ids=lambda: list(fed), state_bytes=state_bytes)
    return SimpleNamespace(client=client, model=SimpleNamespace(spec=SimpleNamespace(key=model)),
                           max_length=max_length, closed_reason=None, stream=stream)


def test_the_longest_fed_prefix_of_the_same_client_and_model_is_taken():
    pool = WarmPool(WarmPoolLimits(max_sessions=8, max_per_client=8))
    short, long_, other_client, other_model = (finished_session([1, 2]), finished_session([1, 2, 3, 4]),
                                               finished_session([1, 2, 3, 4, 5], client="b"),
                                               finished_session([1, 2, 3, 4, 5], model="n"))
    for session in (short, long_, other_client, other_model):
        assert pool.park(session) == []
    assert pool.take("a", "m", [1, 2, 3, 4, 5, 6], needed_length=50) == (long_, 4)
    assert pool.take("a", "m", [1, 2, 3, 4, 5, 6], needed_length=50) == (short, 2)
    assert pool.take("a", "m", [1, 2, 3, 4, 5, 6], needed_length=50) == (None, 0)
    assert len(pool) == 2


def test_a_session_that_parts_from_the_prompt_is_taken_back_to_where_they_part():
    pool = WarmPool(WarmPoolLimits(max_sessions=8, max_per_client=8))
    conversation = list(range(100, 140))  # 40 tokens: a long turn, then its reply
    pool.park(finished_session(conversation))
    # The last reply regenerated: the prompt shares the first 30 tokens, then differs.
    session, shared = pool.take("a", "m", conversation[:30] + [7, 8], needed_length=50)
    assert session is not None and shared == 30
    pool.park(session)
    # Too little in common to be worth going back for: a fresh session.
    assert pool.take("a", "m", conversation[:10] + [7, 8], needed_length=50) == (None, 0)
    # The whole prompt held: all but its last token count, which is fed again to get a reply.
    assert pool.take("a", "m", conversation[:36], needed_length=50) == (session, 35)


def test_a_prompt_that_differs_is_no_longer_or_does_not_fit_misses():
    pool = WarmPool(WarmPoolLimits(max_sessions=8))
    session = finished_session([1, 2, 3], max_length=10)
    pool.park(session)
    assert pool.take("a", "m", [1, 9, 3, 4], needed_length=8) == (None, 0)  # a token differs early on
    assert pool.take("a", "m", [1, 2, 3], needed_length=8) == (None, 0)  # nothing new to feed
    assert pool.take("a", "m", [1, 2, 3, 4], needed_length=11) == (None, 0)  # no room for the reply
    session.closed_reason = "idle"
    assert pool.take("a", "m", [1, 2, 3, 4], needed_length=8) == (None, 0) and len(pool) == 0


def test_limits_push_out_the_oldest_and_age_expires():
    clock = Clock()
    pool = WarmPool(WarmPoolLimits(max_sessions=2, max_per_client=2, max_age=10, max_state_bytes=100), clock)
    first, second, third = (finished_session([n]) for n in range(3))
    assert pool.park(first) == [] and pool.park(second) == []
    assert pool.park(third) == [first]  # the count
    assert pool.park(finished_session([7], state_bytes=101)) != []  # too big to wait at all
    big = finished_session([8], client="b", state_bytes=95)
    assert pool.park(big) == [second, third]  # the memory: oldest first until it fits
    clock.now = 11
    assert pool.expired() == [big] and len(pool) == 0


def test_one_client_keeps_at_most_its_share_and_evicting_prefers_the_client():
    pool = WarmPool(WarmPoolLimits(max_sessions=8, max_per_client=1))
    mine, theirs, newer = finished_session([1]), finished_session([2], client="b"), finished_session([3])
    pool.park(mine), pool.park(theirs)
    assert pool.park(newer) == [mine]
    assert pool.evict("b") is theirs and pool.evict("b") is None
    assert pool.evict() is newer and pool.evict() is None


def test_reuse_off_keeps_nothing_and_sizes_sessions_exactly():
    pool = WarmPool(WarmPoolLimits(max_sessions=0))
    session = finished_session([1])
    assert pool.park(session) == [session]
    assert pool.session_length(100, 8192) == 100
    assert WarmPool(WarmPoolLimits(headroom_tokens=1024)).session_length(7500, 8192) == 8192
