"""One account's limits as they are spent: requests and tokens per minute, the daily token budget.

An account is an API key, the server's single ``--api-key`` (no limits), or an anonymous client
address. Requests per minute are taken when a request arrives, before its body is read. Tokens
per minute and the daily budget are taken per generation: its prompt once it is tokenized, its
reply as it is written. The daily budget is exact to the token: a generation is granted at most
the tokens the budget has left (``Grant.max_new_tokens``), and those are reserved until it ends,
so that generations running side by side never spend the same tokens twice.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

from sessions.accounts.store import SECONDS_PER_DAY, KeyLimits, utc_day
from sessions.errors import ModelNotAllowed, QuotaExceeded, RateLimited


def seconds_to_next_day(unix_time: float) -> float:
    """Seconds from ``unix_time`` until the next UTC midnight, when daily budgets start again."""
    return SECONDS_PER_DAY - unix_time % SECONDS_PER_DAY


def format_reset(seconds: float) -> str:
    """A wait as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{rest}s"


class MinuteRate:
    """A limit per minute that refills continuously: ``per_minute`` units when full, one more
    every 60/``per_minute`` seconds. Spending may run it below zero (a reply's tokens are spent
    as they are written); nothing new is allowed until it is back above zero."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._level = float(per_minute)
        self._last = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._level = min(self.per_minute, self._level + (now - self._last) * self.per_minute / 60)
        self._last = now
        return self._level

    @property
    def remaining(self) -> int:
        """Whole units available now (never below 0)."""
        return max(0, math.floor(self._refill()))

    def wait_for(self, units: float) -> float:
        """Seconds until ``units`` are available (0: now)."""
        missing = units - self._refill()
        return max(0.0, missing * 60 / self.per_minute)

    @property
    def reset_seconds(self) -> float:
        """Seconds until the limit is full again."""
        return self.wait_for(self.per_minute)

    def spend(self, units: float) -> None:
        """Takes ``units`` (the level may go below zero)."""
        self._refill()
        self._level -= units


@dataclass
class UsageCounts:
    """What an account used of one model on one day."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens, as the daily budget counts them."""
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "UsageCounts") -> None:
        """Adds ``other``'s counts to these."""
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.completion_tokens += other.completion_tokens


# Hears of every generation that ends: (account name, model, day, its counts, the peer ids of
# the swarm servers that served it).
UsageSink = Callable[[str, str, str, UsageCounts, Iterable[str]], None]


class Account:
    """The limits of one key (or anonymous client) and what it spent of them.

    ``name`` is what usage is accounted under: the key's name, ``api-key`` or ``anonymous``.
    """

    def __init__(self, name: str, limits: KeyLimits, record_usage: UsageSink,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.name = name
        self.limits = limits
        self._record_usage = record_usage
        self._clock = clock
        self._wall_clock = wall_clock
        self.requests = MinuteRate(limits.requests_per_minute, clock) if limits.requests_per_minute else None
        self.tokens = MinuteRate(limits.tokens_per_minute, clock) if limits.tokens_per_minute else None
        self.day = utc_day(wall_clock())
        self.today: Dict[str, UsageCounts] = {}  # per model
        self.reserved_tokens = 0  # granted to generations still running

    def change_limits(self, limits: KeyLimits) -> None:
        """Applies new limits (the key was changed); what was spent today still counts."""
        if limits.requests_per_minute != self.limits.requests_per_minute:
            self.requests = MinuteRate(limits.requests_per_minute, self._clock) if limits.requests_per_minute else None
        if limits.tokens_per_minute != self.limits.tokens_per_minute:
            self.tokens = MinuteRate(limits.tokens_per_minute, self._clock) if limits.tokens_per_minute else None
        self.limits = limits

    def _roll_day(self) -> None:
        day = utc_day(self._wall_clock())
        if day != self.day:
            self.day, self.today = day, {}

    @property
    def used_today(self) -> int:
        """Tokens (prompt plus completion) spent today, all models together."""
        self._roll_day()
        return sum(counts.total_tokens for counts in self.today.values())

    @property
    def daily_remaining(self) -> Optional[int]:
        """Tokens the daily budget has left for new generations (None: no budget)."""
        if not self.limits.daily_tokens:
            return None
        return max(0, self.limits.daily_tokens - self.used_today - self.reserved_tokens)

    def restore_today(self, model: str, counts: UsageCounts) -> None:
        """Counts usage recorded earlier today (before a restart) against today's budget."""
        self._roll_day()
        self.today.setdefault(model, UsageCounts()).add(counts)

    def check_model(self, model: str) -> None:
        """``ModelNotAllowed`` unless this account may use ``model``."""
        if self.limits.models and model not in self.limits.models:
            raise ModelNotAllowed(f"This API key may not use {model}; it may use: {', '.join(self.limits.models)}",
                                  param="model")

    def take_request(self) -> None:
        """Counts one request against the requests per minute, or raises ``RateLimited``."""
        if self.requests is None:
            return
        if self.requests.remaining < 1:
            raise RateLimited(f"Rate limit reached: {self.limits.requests_per_minute} requests per minute",
                              retry_after=self.requests.wait_for(1))
        self.requests.spend(1)

    def grant(self, model: str, prompt_tokens: int, cached_tokens: int, wanted: int) -> "Grant":
        """Lets a generation of ``model`` feed its prompt and write up to ``wanted`` tokens, within
        the tokens per minute and the daily budget: ``RateLimited`` or ``QuotaExceeded`` when it
        may write none. Without a daily budget the grant bounds nothing (``max_new_tokens`` None)."""
        if self.tokens is not None and self.tokens.remaining < 1:
            raise RateLimited(f"Rate limit reached: {self.limits.tokens_per_minute} tokens per minute",
                              retry_after=self.tokens.wait_for(1))
        max_new_tokens = None
        remaining = self.daily_remaining
        if remaining is not None:
            if remaining < prompt_tokens + 1:
                raise QuotaExceeded(
                    f"The daily budget of {self.limits.daily_tokens} tokens is spent: {remaining} left, and this "
                    f"prompt is {prompt_tokens} tokens; it starts again at 00:00 UTC",
                    retry_after=seconds_to_next_day(self._wall_clock()))
            max_new_tokens = min(wanted, remaining - prompt_tokens)
        grant = Grant(self, model, prompt_tokens, cached_tokens, max_new_tokens, self.day)
        if self.tokens is not None:
            self.tokens.spend(prompt_tokens)
        if remaining is not None:
            self.reserved_tokens += grant.reserved
        return grant

    def settle(self, grant: "Grant", completion_tokens: int, servers: Iterable[str]) -> None:
        """Accounts a generation that ended (through ``Grant.settle``), and frees what it had reserved."""
        self.reserved_tokens = max(0, self.reserved_tokens - grant.reserved)
        if self.tokens is not None:
            self.tokens.spend(completion_tokens)
        counts = UsageCounts(1, grant.prompt_tokens, grant.cached_tokens, completion_tokens)
        self._roll_day()
        if grant.day == self.day:
            self.today.setdefault(grant.model, UsageCounts()).add(counts)
        self._record_usage(self.name, grant.model, grant.day, counts, servers)

    def rate_headers(self) -> Dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits this account has (none for the others)."""
        headers = {}
        for kind, rate in (("requests", self.requests), ("tokens", self.tokens)):
            if rate is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(rate.per_minute)
                headers[f"x-ratelimit-remaining-{kind}"] = str(rate.remaining)
                headers[f"x-ratelimit-reset-{kind}"] = format_reset(rate.reset_seconds)
        return headers


class Grant:
    """One generation's leave to spend: its prompt, and at most ``max_new_tokens`` more (None:
    no budget bounds it). ``settle`` accounts what it wrote, once."""

    def __init__(self, account: Account, model: str, prompt_tokens: int, cached_tokens: int,
                 max_new_tokens: Optional[int], day: str):
        self.account = account
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.max_new_tokens = max_new_tokens
        self.day = day
        self.reserved = prompt_tokens + (max_new_tokens or 0) if account.limits.daily_tokens else 0
        self.settled = False

    def settle(self, completion_tokens: int, servers: Iterable[str] = ()) -> None:
        """The generation ended having written ``completion_tokens``, through ``servers`` (peer ids)."""
        if not self.settled:
            self.settled = True
            self.account.settle(self, completion_tokens, servers)
