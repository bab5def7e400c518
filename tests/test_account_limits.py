"""An account's limits as they are spent, and the book that identifies callers and keeps usage."""

import asyncio

import pytest

from config import Settings
from handlers.native_replies import AccountUsage
from sessions.accounts.book import KEY_CLIENT_PREFIX, AccountBook
from sessions.accounts.limits import Account, MinuteRate, UsageCounts, format_reset
from sessions.accounts.store import ANONYMOUS, KeyLimits, KeyStore
from sessions.errors import ModelNotAllowed, QuotaExceeded, RateLimited, Unauthorized
from tests.helpers import add_keys


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def account(limits: KeyLimits, clock: Clock = None, wall_clock: Clock = None, used: list = None) -> Account:
    used = used if used is not None else []
    return Account("alice", limits, lambda *usage: used.append(usage), clock or Clock(), wall_clock or Clock())


def test_resets_are_written_as_openai_writes_them():
    assert [format_reset(seconds) for seconds in (0.02, 0.5, 1, 1.55, 59.9, 60, 360, 3725)] == \
        ["20ms", "500ms", "1s", "1.6s", "59.9s", "1m0s", "6m0s", "1h2m5s"]


def test_a_rate_per_minute_refills_continuously_and_may_run_into_debt():
    clock = Clock()
    rate = MinuteRate(60, clock)
    rate.spend(60)
    assert rate.remaining == 0 and rate.wait_for(1) == pytest.approx(1.0)
    clock.now += 30
    assert rate.remaining == 30 and rate.reset_seconds == pytest.approx(30)
    rate.spend(100)  # a reply's tokens are spent as they come
    assert rate.remaining == 0 and rate.wait_for(1) == pytest.approx(71)
    clock.now += 1000
    assert rate.remaining == 60  # never above its limit


def test_requests_per_minute_are_refused_with_when_to_retry():
    clock = Clock()
    limited = account(KeyLimits(requests_per_minute=2), clock)
    limited.take_request()
    limited.take_request()
    with pytest.raises(RateLimited, match="2 requests per minute") as refused:
        limited.take_request()
    assert refused.value.retry_after == pytest.approx(30) and refused.value.status == 429
    clock.now += 30
    limited.take_request()
    headers = limited.rate_headers()
    assert headers == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
                       "x-ratelimit-reset-requests": "1m0s"}


def test_the_daily_budget_grants_no_more_than_is_left_and_reserves_it():
    used = []
    budget = account(KeyLimits(daily_tokens=100), used=used)
    first = budget.grant("m", prompt_tokens=10, cached_tokens=4, wanted=50)
    assert first.max_new_tokens == 50 and budget.daily_remaining == 40
    second = budget.grant("m", prompt_tokens=10, cached_tokens=0, wanted=500)  # side by side: what is left
    assert second.max_new_tokens == 30 and budget.daily_remaining == 0
    with pytest.raises(QuotaExceeded, match="daily budget of 100 tokens") as refused:
        budget.grant("m", prompt_tokens=1, cached_tokens=0, wanted=1)
    assert 0 < refused.value.retry_after <= 86_400
    first.settle(20, ["peer-a", "peer-b"])
    first.settle(20)  # once only
    assert budget.used_today == 30 and budget.daily_remaining == 100 - 30 - 40
    second.settle(30)
    assert budget.used_today == 70 and budget.daily_remaining == 30
    assert budget.today["m"] == UsageCounts(requests=2, prompt_tokens=20, cached_tokens=4, completion_tokens=50)
    assert [usage[:4] for usage in used] == [("alice", "m", budget.day, UsageCounts(1, 10, 4, 20)),
                                             ("alice", "m", budget.day, UsageCounts(1, 10, 0, 30))]
    assert set(used[0][4]) == {"peer-a", "peer-b"}
    with pytest.raises(QuotaExceeded):  # a prompt longer than what is left is refused whole
        budget.grant("m", prompt_tokens=30, cached_tokens=0, wanted=1)
    assert budget.grant("m", prompt_tokens=29, cached_tokens=0, wanted=10).max_new_tokens == 1


def test_without_a_budget_a_grant_bounds_nothing_and_the_budget_starts_again_each_day():
    assert account(KeyLimits()).grant("m", 10, 0, wanted=5).max_new_tokens is None
    wall = Clock(86_400 * 100 + 3600)
    budget = account(KeyLimits(daily_tokens=20), wall_clock=wall)
    budget.grant("m", 10, 0, wanted=10).settle(10)
    with pytest.raises(QuotaExceeded):
        budget.grant("m", 1, 0, wanted=1)
    wall.now += 86_400
    assert budget.daily_remaining == 20 and budget.today == {}


def test_tokens_per_minute_refuse_once_spent():
    clock = Clock()
    limited = account(KeyLimits(tokens_per_minute=60), clock)
    limited.grant("m", 30, 0, wanted=100).settle(40)  # 70 of 60: in debt
    with pytest.raises(RateLimited, match="60 tokens per minute") as refused:
        limited.grant("m", 1, 0, wanted=1)
    assert refused.value.retry_after == pytest.approx(11)
    clock.now += 11
    limited.grant("m", 1, 0, wanted=1)


def test_a_key_may_use_only_its_models():
    limited = account(KeyLimits(models=("a", "b")))
    limited.check_model("b")
    with pytest.raises(ModelNotAllowed, match="may use: a, b"):
        limited.check_model("c")
    account(KeyLimits()).check_model("c")


def test_callers_are_identified_by_their_key(tmp_path):
    alice = add_keys(tmp_path / "keys.db", alice=KeyLimits(sessions=3, weight=4))["alice"]

    async def scenario():
        book = AccountBook(Settings(keys_db=tmp_path / "keys.db"))
        await book.start()
        try:
            caller = book.identify(alice, "10.0.0.1")
            assert caller.client == KEY_CLIENT_PREFIX + "alice" and caller.account.name == "alice"
            assert book.account_for(caller.client) is caller.account
            assert (book.key_session_limit(caller.client), book.weight_of(caller.client)) == (3, 4)
            assert book.key_session_limit("10.0.0.1") is None
            assert (book.weight_of("10.0.0.1"), book.weight_of(None)) == (1, 1)
            for presented in (None, alice + "x", "sk-swarm-guess"):
                with pytest.raises(Unauthorized):
                    book.identify(presented, "10.0.0.1")
        finally:
            await book.close()
        anonymous = AccountBook(Settings(keys_db=tmp_path / "keys.db", anonymous_requests_per_minute=5))
        await anonymous.start()
        try:
            first = anonymous.identify(None, "10.0.0.1", allow_anonymous=True)
            second = anonymous.identify(None, "10.0.0.2", allow_anonymous=True)
            assert first.client == "10.0.0.1" and first.account.name == ANONYMOUS
            assert first.account is not second.account  # limits per address
            assert first.account.limits.requests_per_minute == 5
            with pytest.raises(Unauthorized):  # a wrong key is not taken for no key
                anonymous.identify("sk-swarm-guess", "10.0.0.1", allow_anonymous=True)
        finally:
            await anonymous.close()

    asyncio.run(scenario())


def test_usage_is_written_and_counted_again_after_a_restart(tmp_path):
    path = tmp_path / "keys.db"
    alice = add_keys(path, alice=KeyLimits(daily_tokens=1000))["alice"]
    settings = Settings(keys_db=path)

    async def serve_once(prompt: int, completion: int) -> int:
        book = AccountBook(settings)
        await book.start()
        try:
            caller = book.identify(alice, "10.0.0.1")
            before = caller.account.used_today
            caller.account.grant("m", prompt, 2, wanted=completion).settle(completion, ["peer-a"])
            return before
        finally:
            await book.close()  # writes what is pending

    assert asyncio.run(serve_once(10, 5)) == 0
    assert asyncio.run(serve_once(20, 7)) == 15  # the first run's tokens still count against today
    with KeyStore(path) as store:
        [row] = store.usage(key="alice")
    assert (row.requests, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (2, 30, 4, 12)
    assert dict(row.servers) == {"peer-a": 2}


def test_with_no_key_configured_everyone_is_served_without_one():
    book = AccountBook(Settings())
    caller = book.identify("sk-anything", "10.0.0.1")  # an SDK's placeholder key is not looked at
    assert caller.client == "10.0.0.1" and caller.account.limits == KeyLimits()
    caller.account.grant("m", 5, 0, wanted=5).settle(5)
    other = book.identify(None, "10.0.0.2")
    assert AccountUsage.of(other.account, 1).today["total_tokens"] == 0  # each address reads its own use
    assert AccountUsage.of(caller.account, 1).today["total_tokens"] == 10
