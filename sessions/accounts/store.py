"""KeyStore: API keys and their usage in one SQLite file.

A key is kept as the SHA-256 digest of its secret and the secret's first characters (for people
to recognise it); the secret itself is shown once, when the key is made, and never stored. Usage
is kept as counts per key, model and UTC day, with the swarm servers (peer ids) that served it;
no prompt or reply text is ever stored.

The file is in WAL mode so that the management command may write while a server reads it. Every
method blocks: callers on an event loop run them in a thread.
"""

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

# The version of the tables below, kept in the file's ``PRAGMA user_version``.
SCHEMA_VERSION = 1
SECONDS_PER_DAY = 86_400  # a UTC day, as usage is accounted by
SECRET_PREFIX = "sk-swarm-"
SHOWN_PREFIX_LENGTH = 16  # the fixed "sk-swarm-" and 7 characters of the secret
# The usage of clients that present no key, and of the server's single --api-key, is accounted
# under these names, so no key may take them.
ANONYMOUS = "anonymous"
API_KEY = "api-key"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_WEIGHT = 1000.0
MAX_MODELS = 64
MAX_MODEL_KEY_LENGTH = 200
# The largest integer an SQLite column holds.
MAX_LIMIT = 2**63 - 1
# How long a write waits for another connection's write to finish.
BUSY_TIMEOUT_S = 5.0
LIMIT_COLUMNS = ("requests_per_minute", "tokens_per_minute", "sessions", "daily_tokens", "models", "weight")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    requests_per_minute INTEGER NOT NULL,
    tokens_per_minute INTEGER NOT NULL,
    sessions INTEGER NOT NULL,
    daily_tokens INTEGER NOT NULL,
    models TEXT NOT NULL,
    weight REAL NOT NULL,
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    day TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (key, model, day)
);
CREATE TABLE IF NOT EXISTS usage_servers (
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    day TEXT NOT NULL,
    server TEXT NOT NULL,
    generations INTEGER NOT NULL,
    PRIMARY KEY (key, model, day, server)
);
"""


class KeyStoreError(Exception):
    """A refusal of the key store (a bad name or limit, an unknown key) or a failure of its file."""


@dataclass(frozen=True)
class KeyLimits:
    """What one API key may use; 0 (or an empty ``models``) means no limit of that kind."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    sessions: int = 0  # concurrent inference sessions (0: the server's per-client limit)
    daily_tokens: int = 0  # prompt plus completion tokens per UTC day
    models: Tuple[str, ...] = ()  # the model keys it may use (empty: all)
    weight: float = 1.0  # its share of the swarm's steps relative to other clients (> 0)


@dataclass(frozen=True)
class KeyRecord:
    """One stored key: never its secret, only what identifies it to people and its limits."""

    name: str
    prefix: str  # the secret's first characters
    limits: KeyLimits
    created: float  # unix time
    revoked: Optional[float]  # unix time; None while the key is active


@dataclass(frozen=True)
class UsageDelta:
    """Usage to add to one (key, model, UTC day): counts, and the swarm servers (peer ids) that served it."""

    key: str  # a key's name, ANONYMOUS or API_KEY
    model: str
    day: str  # "YYYY-MM-DD", UTC
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    servers: Mapping[str, int] = field(default_factory=dict)  # peer id -> generations it served


@dataclass(frozen=True)
class UsageRow(UsageDelta):
    """The usage stored for one (key, model, UTC day): the sum of every delta recorded for it."""


def key_digest(secret: str) -> str:
    """The SHA-256 hex digest of a key's secret: what the store keeps and the server looks keys up by."""
    return hashlib.sha256(secret.encode()).hexdigest()


def utc_day(when: Optional[float] = None) -> str:
    """The UTC day ("YYYY-MM-DD") of a unix time (now by default), as usage is accounted by."""
    moment = datetime.datetime.fromtimestamp(time.time() if when is None else when, datetime.timezone.utc)
    return moment.date().isoformat()


def check_name(name: str) -> None:
    """Refuses a name that is not 1-64 characters of letters, digits, ``_``, ``.`` and ``-``, or is
    ANONYMOUS or API_KEY."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeyStoreError(f"invalid key name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    if name in (ANONYMOUS, API_KEY):
        raise KeyStoreError(f"the name {name!r} is reserved for the usage of clients without a key of the database")


def check_limits(limits: KeyLimits) -> None:
    """Refuses limits a server could not apply."""
    for kind in ("requests_per_minute", "tokens_per_minute", "sessions", "daily_tokens"):
        value = getattr(limits, kind)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
            raise KeyStoreError(f"{kind} must be a whole number from 0 (no limit) up, not {value!r}")
    weight = limits.weight
    # Written so that NaN fails it too.
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= MAX_WEIGHT:
        raise KeyStoreError(f"weight must be a number above 0 and at most {MAX_WEIGHT:g}, not {weight!r}")
    if not isinstance(limits.models, tuple) or len(limits.models) > MAX_MODELS:
        raise KeyStoreError(f"models must be a tuple of at most {MAX_MODELS} model keys")
    for model in limits.models:
        if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_KEY_LENGTH:
            raise KeyStoreError(f"a model key must be 1-{MAX_MODEL_KEY_LENGTH} characters, not {model!r}")


def _limit_values(limits: KeyLimits) -> Tuple[object, ...]:
    """The limits as stored, in the order of LIMIT_COLUMNS."""
    return (limits.requests_per_minute, limits.tokens_per_minute, limits.sessions, limits.daily_tokens,
            json.dumps(list(limits.models)), float(limits.weight))


def _stored_limits(requests_per_minute: int, tokens_per_minute: int, sessions: int, daily_tokens: int, models: str,
                   weight: float) -> KeyLimits:
    """The limits from their stored values, in the order of LIMIT_COLUMNS."""
    return KeyLimits(requests_per_minute, tokens_per_minute, sessions, daily_tokens, tuple(json.loads(models)), weight)


class KeyStore:
    """The keys and usage in the SQLite file at ``path`` (made, with its tables, if missing).

    One connection serves every thread, one call at a time.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"]):
        self._path = os.fspath(path)
        self._lock = threading.Lock()
        # data_version's count: raised by this connection's key writes and by writes of others it sees.
        self._version = 0
        self._seen_data_version: Optional[int] = None
        try:
            self._connection = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                               check_same_thread=False)
        except sqlite3.Error as error:
            raise KeyStoreError(f"cannot open the key database {self._path}: {error}") from error
        try:
            self._prepare_file()
        except BaseException:
            self._connection.close()
            raise

    def __enter__(self) -> "KeyStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the file; the store may not be used after."""
        with self._lock:
            self._connection.close()

    def _prepare_file(self) -> None:
        """Puts the file in WAL mode and makes the tables of a new file; refuses a file made by a newer
        version of the server."""
        try:
            self._connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as error:  # e.g. the file is not an SQLite database
            raise KeyStoreError(f"cannot open the key database {self._path}: {error}") from error
        with self._transaction(immediate=True) as connection:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise KeyStoreError(f"the key database {self._path} has schema version {version}, newer than this "
                                    f"server's ({SCHEMA_VERSION}): run a newer server")
            if version < SCHEMA_VERSION:
                for statement in SCHEMA.split(";"):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self, immediate: bool) -> Iterator[sqlite3.Connection]:
        """The connection within one transaction, held under the lock; ``immediate`` takes the write
        lock at once, so a read-then-write cannot be overtaken. SQLite's errors come out as KeyStoreError."""
        with self._lock:
            try:
                self._connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    yield self._connection
                except BaseException:
                    self._connection.execute("ROLLBACK")
                    raise
                self._connection.execute("COMMIT")
            except sqlite3.Error as error:
                raise KeyStoreError(f"key database {self._path}: {error}") from error

    def add_key(self, name: str, limits: KeyLimits) -> str:
        """Makes a key with these limits and returns its secret, which is not stored and cannot be shown again.

        A name is never reused, not even that of a revoked key, so usage stays with the key it was accounted to.
        """
        check_name(name)
        check_limits(limits)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        with self._transaction(immediate=True) as connection:
            existing = connection.execute("SELECT revoked FROM keys WHERE name = ?", (name,)).fetchone()
            if existing is not None:
                state = "an active key" if existing[0] is None else "a revoked key (names are not reused)"
                raise KeyStoreError(f"the name {name!r} is taken by {state}")
            connection.execute(
                f"INSERT INTO keys (name, digest, prefix, {', '.join(LIMIT_COLUMNS)}, created, revoked) "
                f"VALUES (?, ?, ?, {', '.join('?' * len(LIMIT_COLUMNS))}, ?, NULL)",
                (name, key_digest(secret), secret[:SHOWN_PREFIX_LENGTH], *_limit_values(limits), time.time()))
            self._version += 1
        return secret

    def update_limits(self, name: str, limits: KeyLimits) -> None:
        """Replaces the limits of the active key ``name``."""
        check_limits(limits)
        assignments = ", ".join(f"{column} = ?" for column in LIMIT_COLUMNS)
        self._change_active_key(name, f"UPDATE keys SET {assignments} WHERE name = ? AND revoked IS NULL",
                                (*_limit_values(limits), name))

    def revoke(self, name: str) -> None:
        """Revokes the active key ``name``: it is refused from then on, and its name stays taken."""
        self._change_active_key(name, "UPDATE keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                                (time.time(), name))

    def _change_active_key(self, name: str, statement: str, parameters: Tuple[object, ...]) -> None:
        with self._transaction(immediate=True) as connection:
            if connection.execute(statement, parameters).rowcount == 0:
                raise KeyStoreError(f"no active key is named {name!r}")
            self._version += 1

    def keys(self, include_revoked: bool = True) -> List[KeyRecord]:
        """The stored keys, by name."""
        return [record for _, record in self._key_rows("" if include_revoked else "WHERE revoked IS NULL")]

    def active_keys(self) -> Dict[str, KeyRecord]:
        """The active keys by the digest of their secret (see ``key_digest``)."""
        return dict(self._key_rows("WHERE revoked IS NULL"))

    def _key_rows(self, condition: str) -> List[Tuple[str, KeyRecord]]:
        """(digest, record) of the keys that meet ``condition`` (a WHERE clause, or nothing), by name."""
        with self._transaction(immediate=False) as connection:
            rows = connection.execute(
                f"SELECT digest, name, prefix, {', '.join(LIMIT_COLUMNS)}, created, revoked FROM keys {condition} "
                f"ORDER BY name").fetchall()
        return [(digest, KeyRecord(name, prefix, _stored_limits(*limits), created, revoked))
                for digest, name, prefix, *limits, created, revoked in rows]

    def data_version(self) -> int:
        """A number that changes whenever the keys may have changed: this store changed a key, or another
        connection wrote to the file. Cheap enough to poll before deciding to reload the keys."""
        with self._transaction(immediate=False) as connection:
            seen = connection.execute("PRAGMA data_version").fetchone()[0]
            if seen != self._seen_data_version:
                # The first look counts too: it cannot tell what happened before it.
                self._seen_data_version = seen
                self._version += 1
            return self._version

    def record_usage(self, deltas: Iterable[UsageDelta]) -> None:
        """Adds the deltas to the stored usage, all of them or (on a failure) none."""
        deltas = list(deltas)
        if not deltas:
            return
        with self._transaction(immediate=True) as connection:
            connection.executemany(
                "INSERT INTO usage (key, model, day, requests, prompt_tokens, cached_tokens, completion_tokens) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, model, day) DO UPDATE SET "
                "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "cached_tokens = cached_tokens + excluded.cached_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens",
                [(delta.key, delta.model, delta.day, delta.requests, delta.prompt_tokens, delta.cached_tokens,
                  delta.completion_tokens) for delta in deltas])
            connection.executemany(
                "INSERT INTO usage_servers (key, model, day, server, generations) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (key, model, day, server) DO UPDATE SET generations = generations + excluded.generations",
                [(delta.key, delta.model, delta.day, server, generations)
                 for delta in deltas for server, generations in delta.servers.items()])

    def usage(self, key: Optional[str] = None, since_day: Optional[str] = None) -> List[UsageRow]:
        """The stored usage, of one key (or ANONYMOUS) or all, from ``since_day`` ("YYYY-MM-DD") on or all
        days; by day, key and model."""
        with self._transaction(immediate=False) as connection:
            rows = connection.execute(
                "SELECT u.key, u.model, u.day, u.requests, u.prompt_tokens, u.cached_tokens, u.completion_tokens, "
                "s.server, s.generations FROM usage AS u LEFT JOIN usage_servers AS s "
                "ON s.key = u.key AND s.model = u.model AND s.day = u.day "
                "WHERE (:key IS NULL OR u.key = :key) AND (:since IS NULL OR u.day >= :since) "
                "ORDER BY u.day, u.key, u.model, s.server", {"key": key, "since": since_day}).fetchall()
        usage = []
        for counts, group in itertools.groupby(rows, key=lambda row: row[:7]):
            key_name, model, day, requests, prompt_tokens, cached_tokens, completion_tokens = counts
            servers = {server: generations for *_, server, generations in group if server is not None}
            usage.append(UsageRow(key_name, model, day, requests, prompt_tokens, cached_tokens, completion_tokens,
                                  servers))
        return usage
