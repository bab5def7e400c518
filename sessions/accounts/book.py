"""Who a request is, and what every account has spent: the server's book of API keys and usage.

A request is identified once, from the key it presents (``identify``): an API key of the key
database (``--keys-db``) makes it the client ``key:NAME``, whose limits are the key's; the app's
``--api-key`` makes it ``api-key:ADDRESS``, without limits; a client without a key is its
address, within the ``--anonymous-*`` limits. The app says which keys it asks for (its
``--api-key`` and ``--allow-anonymous``); the book holds the keys of the database, every
account and the usage. Everything the book does with the database (open it,
reload the keys when the ``keys`` command changed them, write usage) runs in a thread of its
own, never on the event loop; usage is written once a second and at shutdown.
"""

import asyncio
import collections
import hmac
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Counter, Dict, Iterable, NamedTuple, Optional, Tuple

from config import Settings
from sessions.accounts.limits import Account, UsageCounts
from sessions.accounts.store import (
    ANONYMOUS,
    API_KEY,
    KeyLimits,
    KeyRecord,
    KeyStore,
    UsageDelta,
    key_digest,
    utc_day,
)
from sessions.errors import Unauthorized

logger = logging.getLogger(__name__)

KEY_CLIENT_PREFIX = "key:"  # a client with a key of the database, by the key's name
API_KEY_CLIENT_PREFIX = "api-key:"  # a client with --api-key, by its address
# Seconds between writes of the usage accounted meanwhile, and between checks for changed keys.
FLUSH_SECONDS = 1.0
RELOAD_SECONDS = 5.0
# Anonymous addresses whose spending is remembered (the least recently seen are forgotten first).
REMEMBERED_ADDRESSES = 10_000


class Caller(NamedTuple):
    """Whom a request counts against: its ``client`` (for per-client limits and turns) and its ``account``."""

    client: str
    account: Account


class AccountBook:
    """Every account of the server, the keys that name them, and the usage not yet written."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._records: Dict[str, KeyRecord] = {}  # active keys, by digest
        # Every key's account, by name, made as its key is loaded (revoked ones kept for their sessions).
        self._accounts: Dict[str, Account] = {}
        self._api_key_account = Account(API_KEY, KeyLimits(), self._account_used)
        self._anonymous_limits = KeyLimits(requests_per_minute=settings.anonymous_requests_per_minute,
                                           tokens_per_minute=settings.anonymous_tokens_per_minute,
                                           daily_tokens=settings.anonymous_daily_tokens)
        # Per address, so that each reads its own usage (the least recently seen forgotten first).
        self._anonymous: "collections.OrderedDict[str, Account]" = collections.OrderedDict()
        self._pending: Dict[Tuple[str, str, str], Tuple[UsageCounts, Counter[str]]] = {}
        self._store: Optional[KeyStore] = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="accounts") if settings.keys_db else None
        self._data_version: Optional[int] = None

    async def _in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def start(self) -> None:
        """Opens the key database, if any: its keys, and today's usage so far (counted against
        today's budgets)."""
        if self._thread is None:
            return
        self._store = await self._in_thread(KeyStore, self.settings.keys_db)
        await self._reload_keys()
        today = utc_day()
        for row in await self._in_thread(lambda: self._store.usage(since_day=today)):
            account = self._api_key_account if row.key == API_KEY else self._accounts.get(row.key)
            if account is not None:
                account.restore_today(row.model, UsageCounts(row.requests, row.prompt_tokens, row.cached_tokens,
                                                             row.completion_tokens))
        logger.info("Key database %s: %d active keys", self.settings.keys_db, len(self._records))

    async def _reload_keys(self) -> None:
        version = await self._in_thread(self._store.data_version)
        if version == self._data_version:
            return
        self._records = await self._in_thread(self._store.active_keys)
        self._data_version = version
        for record in self._records.values():
            account = self._accounts.get(record.name)
            if account is None:
                self._accounts[record.name] = Account(record.name, record.limits, self._account_used)
            elif account.limits != record.limits:
                account.change_limits(record.limits)

    async def run(self) -> None:
        """Writes the usage accounted meanwhile every ``FLUSH_SECONDS`` and picks up changed keys
        every ``RELOAD_SECONDS``, until cancelled."""
        if self._store is None:
            return
        flushes_per_reload = round(RELOAD_SECONDS / FLUSH_SECONDS)
        for count in itertools.count(1):
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
                if count % flushes_per_reload == 0:
                    await self._reload_keys()
            except Exception:  # a locked or broken file: the usage waits for the next write
                logger.exception("Could not update the key database")

    async def flush(self) -> None:
        """Writes the usage accounted since the last write (kept for the next one if it fails)."""
        if self._store is None or not self._pending:
            return
        pending, self._pending = self._pending, {}
        deltas = [UsageDelta(name, model, day, counts.requests, counts.prompt_tokens, counts.cached_tokens,
                             counts.completion_tokens, dict(servers))
                  for (name, model, day), (counts, servers) in pending.items()]
        try:
            await self._in_thread(self._store.record_usage, deltas)
        except BaseException:
            for key, (counts, servers) in pending.items():
                self._add_pending(key, counts, servers)
            raise

    async def close(self) -> None:
        """Writes the last usage and closes the database."""
        if self._thread is None:
            return
        try:
            await self.flush()
        finally:
            if self._store is not None:
                await self._in_thread(self._store.close)
            self._thread.shutdown(wait=False)

    def identify(self, presented: Optional[str], address: str, api_key: Optional[str] = None,
                 allow_anonymous: bool = False) -> Caller:
        """The caller of a request from ``address`` that presents the key ``presented`` (None:
        none), on an app whose single key is ``api_key``: a key of the database is the client
        ``key:NAME``, ``api_key`` the client ``api-key:ADDRESS`` (no limits), no key the address
        itself (anonymous). ``Unauthorized`` for a key this server does not know, or for no key
        where one is required: with any key configured, unless ``allow_anonymous``. Without any
        key configured, a presented key is not looked at."""
        keyed = bool(api_key) or self._thread is not None
        if not keyed:
            return Caller(address, self._anonymous_account(address))
        if presented is None:
            if not allow_anonymous:
                raise Unauthorized("Missing API key (Authorization: Bearer KEY)")
            return Caller(address, self._anonymous_account(address))
        digest = key_digest(presented)
        if api_key and hmac.compare_digest(digest, key_digest(api_key)):
            return Caller(API_KEY_CLIENT_PREFIX + address, self._api_key_account)
        record = self._records.get(digest)
        if record is None:
            raise Unauthorized("Invalid API key")
        return Caller(KEY_CLIENT_PREFIX + record.name, self._accounts[record.name])

    def account_for(self, client: str) -> Account:
        """The account of ``client`` (as ``identify`` named it)."""
        account = self._key_account(client)
        if account is not None:
            return account
        if client.startswith(API_KEY_CLIENT_PREFIX):
            return self._api_key_account
        return self._anonymous_account(client)

    def weight_of(self, client: Optional[str]) -> float:
        """``client``'s share of the swarm's steps, relative to the others (1: an equal one, also
        for the server's own calls, which have no client)."""
        account = self._key_account(client) if client is not None else None
        return account.limits.weight if account is not None else 1.0

    def key_session_limit(self, client: str) -> Optional[int]:
        """The sessions ``client`` may hold at once, if its key says (else the server's setting)."""
        account = self._key_account(client)
        return (account.limits.sessions or None) if account is not None else None

    def _key_account(self, client: str) -> Optional[Account]:
        """The account of a client of a database key (``key:NAME``), None for any other client."""
        return self._accounts.get(client[len(KEY_CLIENT_PREFIX):]) if client.startswith(KEY_CLIENT_PREFIX) else None

    def _anonymous_account(self, address: str) -> Account:
        account = self._anonymous.pop(address, None) or Account(ANONYMOUS, self._anonymous_limits,
                                                                self._account_used)
        self._anonymous[address] = account
        while len(self._anonymous) > REMEMBERED_ADDRESSES:
            self._anonymous.popitem(last=False)
        return account

    def _account_used(self, name: str, model: str, day: str, counts: UsageCounts, servers: Iterable[str]) -> None:
        if self._thread is not None:
            self._add_pending((name, model, day), counts, collections.Counter(servers))

    def _add_pending(self, key: Tuple[str, str, str], counts: UsageCounts, servers: Counter[str]) -> None:
        total, served = self._pending.setdefault(key, (UsageCounts(), collections.Counter()))
        total.add(counts)
        served.update(servers)
