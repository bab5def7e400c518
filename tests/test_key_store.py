"""KeyStore: keys kept by their digest only, their limits checked, names never reused, other
connections' writes seen, and usage summed in the file across calls and reopenings."""

import concurrent.futures
import contextlib
import math
import sqlite3
from pathlib import Path

import pytest

from sessions.accounts.store import (
    ANONYMOUS,
    API_KEY,
    SCHEMA_VERSION,
    SHOWN_PREFIX_LENGTH,
    KeyLimits,
    KeyStore,
    KeyStoreError,
    UsageDelta,
    UsageRow,
    key_digest,
    utc_day,
)

LIMITS = KeyLimits(requests_per_minute=10, tokens_per_minute=2000, sessions=2, daily_tokens=50_000,
                   models=("smollm2", "tiny-llama"), weight=2.5)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def store(db_path: Path):
    with KeyStore(db_path) as opened:
        yield opened


def file_bytes(folder: Path) -> bytes:
    """Everything SQLite wrote in the folder: the database and its WAL files."""
    return b"".join(path.read_bytes() for path in sorted(folder.iterdir()))


def test_a_new_key_is_found_by_the_digest_of_its_secret_which_is_not_stored(store, db_path):
    secret = store.add_key("alice", LIMITS)
    assert secret.startswith("sk-swarm-") and len(secret) > 40
    record = store.active_keys()[key_digest(secret)]
    assert (record.name, record.prefix, record.limits, record.revoked) == (
        "alice", secret[:SHOWN_PREFIX_LENGTH], LIMITS, None)
    assert store.keys() == [record]
    written = file_bytes(db_path.parent)
    assert key_digest(secret).encode() in written  # the files that hold the key are read
    assert secret.encode() not in written
    store.close()  # the WAL is written into the database
    closed = file_bytes(db_path.parent)
    assert key_digest(secret).encode() in closed and secret.encode() not in closed


def test_each_key_gets_its_own_secret(store):
    secrets = {store.add_key(name, KeyLimits()) for name in ("a", "b", "c")}
    assert len(secrets) == 3
    assert {record.name for record in store.active_keys().values()} == {"a", "b", "c"}


def test_a_name_is_refused_while_taken_and_after_its_key_is_revoked(store):
    store.add_key("alice", KeyLimits())
    with pytest.raises(KeyStoreError, match="taken by an active key"):
        store.add_key("alice", LIMITS)
    store.revoke("alice")
    with pytest.raises(KeyStoreError, match="taken by a revoked key"):
        store.add_key("alice", KeyLimits())
    assert [record.name for record in store.keys()] == ["alice"]


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/name", "ünï", ANONYMOUS, API_KEY, 7])
def test_invalid_names_are_refused(store, name):
    with pytest.raises(KeyStoreError):
        store.add_key(name, KeyLimits())
    assert store.keys() == []


@pytest.mark.parametrize("limits", [
    KeyLimits(requests_per_minute=-1),
    KeyLimits(tokens_per_minute=1.5),
    KeyLimits(sessions=True),
    KeyLimits(daily_tokens=2**63),
    KeyLimits(weight=0),
    KeyLimits(weight=-1.0),
    KeyLimits(weight=1000.5),
    KeyLimits(weight=math.nan),
    KeyLimits(weight="2"),
    KeyLimits(models=("",)),
    KeyLimits(models=("m" * 201,)),
    KeyLimits(models=tuple(f"m{index}" for index in range(65))),
    KeyLimits(models=["smollm2"]),
])
def test_invalid_limits_are_refused_when_adding_and_updating(store, limits):
    with pytest.raises(KeyStoreError):
        store.add_key("alice", limits)
    store.add_key("bob", KeyLimits())
    with pytest.raises(KeyStoreError):
        store.update_limits("bob", limits)
    assert [(record.name, record.limits) for record in store.keys()] == [("bob", KeyLimits())]


def test_the_largest_limits_are_accepted(store):
    largest = KeyLimits(2**63 - 1, 2**63 - 1, 2**63 - 1, 2**63 - 1, tuple(f"m{index}" for index in range(64)), 1000)
    store.add_key("alice", largest)
    assert store.keys()[0].limits == largest


def test_a_revoked_key_is_no_longer_active_but_still_listed(store):
    alice = store.add_key("alice", KeyLimits())
    bob = store.add_key("bob", KeyLimits())
    store.revoke("alice")
    assert set(store.active_keys()) == {key_digest(bob)}
    assert [(record.name, record.revoked is None) for record in store.keys()] == [("alice", False), ("bob", True)]
    assert [record.name for record in store.keys(include_revoked=False)] == ["bob"]
    assert key_digest(alice) not in store.active_keys()
    with pytest.raises(KeyStoreError, match="no active key"):
        store.revoke("alice")
    with pytest.raises(KeyStoreError, match="no active key"):
        store.update_limits("alice", LIMITS)


def test_updating_limits_replaces_them(store):
    secret = store.add_key("alice", KeyLimits())
    store.update_limits("alice", LIMITS)
    assert store.active_keys()[key_digest(secret)].limits == LIMITS
    with pytest.raises(KeyStoreError, match="no active key"):
        store.update_limits("nobody", LIMITS)


def test_the_data_version_changes_when_another_store_on_the_file_writes(store, db_path):
    version = store.data_version()
    assert store.data_version() == version
    with KeyStore(db_path) as other:
        other.add_key("alice", KeyLimits())
        changed = store.data_version()
        assert changed != version
        assert store.data_version() == changed
        other.revoke("alice")
        assert store.data_version() != changed


def test_the_data_version_changes_when_the_store_itself_changes_a_key(store):
    version = store.data_version()
    store.add_key("alice", KeyLimits())
    after_add = store.data_version()
    assert after_add != version
    store.update_limits("alice", LIMITS)
    assert store.data_version() != after_add


def test_usage_adds_up_across_calls_and_reopening(db_path):
    first = UsageDelta("alice", "smollm2", "2024-05-01", requests=1, prompt_tokens=10, cached_tokens=4,
                       completion_tokens=20, servers={"peerA": 1})
    with KeyStore(db_path) as store:
        store.record_usage([first, first])
        store.record_usage([UsageDelta("alice", "smollm2", "2024-05-01", requests=1, completion_tokens=5,
                                       servers={"peerA": 2, "peerB": 1})])
    with KeyStore(db_path) as reopened:
        reopened.record_usage(iter([first]))
        assert reopened.usage() == [UsageRow("alice", "smollm2", "2024-05-01", requests=4, prompt_tokens=30,
                                             cached_tokens=12, completion_tokens=65,
                                             servers={"peerA": 5, "peerB": 1})]


def test_usage_without_servers_or_deltas(store):
    store.record_usage([])
    assert store.usage() == []
    store.record_usage([UsageDelta(ANONYMOUS, "m", "2024-05-01", requests=1)])
    assert store.usage() == [UsageRow(ANONYMOUS, "m", "2024-05-01", requests=1)]


def test_usage_is_filtered_by_key_and_first_day_and_ordered(store):
    store.record_usage([
        UsageDelta("bob", "m2", "2024-05-02", requests=1),
        UsageDelta("alice", "m2", "2024-05-02", requests=2, servers={"p": 1}),
        UsageDelta("alice", "m1", "2024-05-02", requests=3),
        UsageDelta("alice", "m1", "2024-04-30", requests=4),
        UsageDelta(ANONYMOUS, "m1", "2024-05-01", requests=5),
    ])
    order = [(row.day, row.key, row.model) for row in store.usage()]
    assert order == [("2024-04-30", "alice", "m1"), ("2024-05-01", ANONYMOUS, "m1"),
                     ("2024-05-02", "alice", "m1"), ("2024-05-02", "alice", "m2"), ("2024-05-02", "bob", "m2")]
    assert [row.requests for row in store.usage(key="alice")] == [4, 3, 2]
    assert [row.requests for row in store.usage(since_day="2024-05-01")] == [5, 3, 2, 1]
    assert store.usage(key="alice", since_day="2024-05-02") == [
        UsageRow("alice", "m1", "2024-05-02", requests=3), UsageRow("alice", "m2", "2024-05-02", requests=2,
                                                                      servers={"p": 1})]
    assert store.usage(key="nobody") == []


def test_the_store_serves_other_threads(store):
    delta = UsageDelta("alice", "m", "2024-05-01", requests=1, servers={"p": 1})
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: store.record_usage([delta]), range(40)))
        list(pool.map(lambda name: store.add_key(name, KeyLimits()), [f"k{index}" for index in range(8)]))
    assert store.usage() == [UsageRow("alice", "m", "2024-05-01", requests=40, servers={"p": 40})]
    assert len(store.active_keys()) == 8


def test_a_newer_schema_is_refused(db_path):
    KeyStore(db_path).close()
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(KeyStoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        KeyStore(db_path)


def test_a_file_that_is_no_database_is_refused(db_path):
    db_path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(KeyStoreError, match="cannot open the key database"):
        KeyStore(db_path)


def test_the_file_is_in_wal_mode(store, db_path):
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_utc_day():
    assert utc_day(0) == "1970-01-01"
    assert utc_day(86_400 * 365 - 1) == "1970-12-31"
    assert len(utc_day()) == 10
