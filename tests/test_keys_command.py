"""``server.py keys``: the secret alone on stdout, limits set and changed, keys listed and revoked,
usage shown per key, model and day, and every refusal one ``error:`` line with exit status 2."""

import json
import time
from pathlib import Path

import pytest

from sessions.accounts.command import main
from sessions.accounts.store import SHOWN_PREFIX_LENGTH, KeyLimits, KeyStore, UsageDelta, key_digest, utc_day


@pytest.fixture
def db(tmp_path: Path, monkeypatch) -> Path:
    """The key database, named by the environment as a server's operator would."""
    path = tmp_path / "keys.db"
    monkeypatch.setenv("SWARM_CHAT_KEYS_DB", str(path))
    return path


def run(capsys, *argv: str):
    """The command's exit status, stdout and stderr."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def stored_keys(db: Path):
    with KeyStore(db) as store:
        return {record.name: record for record in store.keys()}


def test_add_prints_only_the_secret_on_stdout(db, capsys):
    status, out, err = run(capsys, "add", "alice", "--requests-per-minute", "10", "--tokens-per-minute", "2000",
                           "--sessions", "2", "--daily-tokens", "50000", "--model", "smollm2", "--model", "tiny",
                           "--weight", "2.5")
    assert status == 0
    secret = out.strip()
    assert out == secret + "\n" and secret.startswith("sk-swarm-")
    assert "only" in err and secret not in err
    with KeyStore(db) as store:
        record = store.active_keys()[key_digest(secret)]
    assert (record.name, record.limits) == ("alice", KeyLimits(10, 2000, 2, 50_000, ("smollm2", "tiny"), 2.5))


def test_add_without_options_sets_no_limits(db, capsys):
    assert run(capsys, "add", "alice")[0] == 0
    assert stored_keys(db)["alice"].limits == KeyLimits()


def test_set_changes_only_the_options_given(db, capsys):
    run(capsys, "add", "alice", "--requests-per-minute", "10", "--model", "smollm2", "--weight", "3")
    status, out, _ = run(capsys, "set", "alice", "--daily-tokens", "500", "--model", "a", "--model", "b")
    assert status == 0 and "alice" in out
    assert stored_keys(db)["alice"].limits == KeyLimits(requests_per_minute=10, daily_tokens=500, models=("a", "b"),
                                                        weight=3.0)
    assert run(capsys, "set", "alice", "--all-models", "--requests-per-minute", "0")[0] == 0
    assert stored_keys(db)["alice"].limits == KeyLimits(daily_tokens=500, weight=3.0)


def test_list_shows_every_key_with_its_limits_and_status(db, capsys):
    alice = run(capsys, "add", "alice", "--requests-per-minute", "10", "--model", "smollm2", "--weight", "2.5")[1]
    run(capsys, "add", "bob", "--daily-tokens", "700")
    run(capsys, "revoke", "bob")
    status, out, _ = run(capsys, "list")
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "PREFIX", "REQ/MIN", "TOKENS/MIN", "SESSIONS", "DAILY", "TOKENS", "MODELS",
                              "WEIGHT", "STATUS"]
    assert [row.split() for row in rows] == [["alice", alice[:SHOWN_PREFIX_LENGTH], "10", "-", "-", "-", "smollm2", "2.5",
                                              "active"],
                                             ["bob", stored_keys(db)["bob"].prefix, "-", "-", "-", "700", "-", "1",
                                              "revoked"]]
    assert alice.strip() not in out


def test_list_json(db, capsys):
    run(capsys, "add", "alice", "--model", "smollm2", "--sessions", "4")
    run(capsys, "add", "bob")
    run(capsys, "revoke", "bob")
    status, out, _ = run(capsys, "list", "--json")
    assert status == 0
    listed = json.loads(out)
    assert [(key["name"], key["status"], key["revoked"] is None) for key in listed] == [("alice", "active", True),
                                                                                         ("bob", "revoked", False)]
    assert listed[0]["limits"] == {"requests_per_minute": 0, "tokens_per_minute": 0, "sessions": 4,
                                   "daily_tokens": 0, "models": ["smollm2"], "weight": 1.0}
    assert listed[0]["prefix"].startswith("sk-swarm-")


def test_revoke(db, capsys):
    secret = run(capsys, "add", "alice")[1].strip()
    status, out, _ = run(capsys, "revoke", "alice")
    assert status == 0 and "alice" in out
    with KeyStore(db) as store:
        assert key_digest(secret) not in store.active_keys()
    assert stored_keys(db)["alice"].revoked is not None


def record_usage(db: Path) -> None:
    today, yesterday = utc_day(), utc_day(time.time() - 86_400)
    with KeyStore(db) as store:
        store.record_usage([
            UsageDelta("alice", "smollm2", today, requests=3, prompt_tokens=30, cached_tokens=12, completion_tokens=90,
                       servers={"12D3KooWAAAAAAAAfirstpeer": 2, "12D3KooWBBBBBBBsecondpeer": 1}),
            UsageDelta("anonymous", "smollm2", yesterday, requests=1, prompt_tokens=5, completion_tokens=7),
            UsageDelta("alice", "smollm2", "2000-01-01", requests=100),
        ])


def test_usage_table_of_the_last_days(db, capsys):
    record_usage(db)
    status, out, _ = run(capsys, "usage")
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split() == ["DAY", "KEY", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "SERVERS"]
    assert [row.split() for row in rows] == [
        [utc_day(time.time() - 86_400), "anonymous", "smollm2", "1", "5", "0", "7", "-"],
        [utc_day(), "alice", "smollm2", "3", "30", "12", "90", "irstpeer:2", "condpeer:1"]]
    assert [row.split()[1] for row in run(capsys, "usage", "alice")[1].splitlines()[1:]] == ["alice"]
    assert [row.split()[0] for row in run(capsys, "usage", "--days", "1")[1].splitlines()[1:]] == [utc_day()]


def test_usage_json(db, capsys):
    record_usage(db)
    status, out, _ = run(capsys, "usage", "alice", "--days", "10000", "--json")
    assert status == 0
    assert json.loads(out) == [
        {"key": "alice", "model": "smollm2", "day": "2000-01-01", "requests": 100, "prompt_tokens": 0,
         "cached_tokens": 0, "completion_tokens": 0, "servers": {}},
        {"key": "alice", "model": "smollm2", "day": utc_day(), "requests": 3, "prompt_tokens": 30,
         "cached_tokens": 12, "completion_tokens": 90,
         "servers": {"12D3KooWAAAAAAAAfirstpeer": 2, "12D3KooWBBBBBBBsecondpeer": 1}}]


def test_db_option_names_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SWARM_CHAT_KEYS_DB", raising=False)
    path = tmp_path / "other.db"
    assert run(capsys, "--db", str(path), "add", "alice")[0] == 0
    assert list(stored_keys(path)) == ["alice"]


@pytest.mark.parametrize("argv, message", [
    (["add", "alice"], "the name 'alice' is taken by an active key"),
    (["add", "bad name"], "invalid key name 'bad name'"),
    (["add", "carol", "--weight", "0"], "weight must be a number above 0"),
    (["add", "carol", "--sessions", "-1"], "sessions must be a whole number"),
    (["set", "nobody", "--weight", "2"], "no active key is named 'nobody'"),
    (["set", "alice"], "nothing to change"),
    (["set", "alice", "--all-models", "--model", "m"], "contradict"),
    (["revoke", "nobody"], "no active key is named 'nobody'"),
    (["usage", "--days", "0"], "--days must be 1 or more"),
])
def test_refusals_are_one_error_line_and_status_2(db, capsys, argv, message):
    run(capsys, "add", "alice", "--model", "smollm2")
    before = stored_keys(db)
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert stored_keys(db) == before


def test_without_a_database_it_says_how_to_name_one(capsys, monkeypatch):
    monkeypatch.delenv("SWARM_CHAT_KEYS_DB", raising=False)
    assert run(capsys, "list") == (2, "", "error: no key database: pass --db or set SWARM_CHAT_KEYS_DB\n")


def test_a_database_that_cannot_be_opened_is_an_error_line(tmp_path, capsys):
    status, out, err = run(capsys, "--db", str(tmp_path / "missing" / "keys.db"), "list")
    assert (status, out) == (2, "") and err.startswith("error: cannot open the key database")


def test_bad_syntax_exits_through_argparse(db, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["add", "alice", "--weight", "heavy"])
    assert exit_info.value.code == 2
    assert "invalid float value" in capsys.readouterr().err
