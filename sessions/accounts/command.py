"""``server.py keys``: add, change, list and revoke API keys, and read the usage accounted to them.

The secret of a new key is printed alone on stdout, so that ``KEY=$(python server.py keys add alice)``
keeps it; everything else a person reads goes to stdout as a table, or as JSON with ``--json``.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Sequence

from sessions.accounts.store import (
    SECONDS_PER_DAY,
    KeyLimits,
    KeyRecord,
    KeyStore,
    KeyStoreError,
    UsageRow,
    utc_day,
)

DB_ENVIRONMENT_VARIABLE = "SWARM_CHAT_KEYS_DB"
# How many of a peer id's last characters a usage table shows.
SHOWN_PEER_ID_LENGTH = 8
# Exit status of a refused command, as argparse's own for bad syntax.
REFUSED = 2


def main(argv: List[str]) -> int:
    """Runs the command ``argv`` (the arguments after ``keys``) and returns its exit status."""
    options = build_parser().parse_args(argv)
    try:
        if not options.db:
            raise KeyStoreError(f"no key database: pass --db or set {DB_ENVIRONMENT_VARIABLE}")
        with KeyStore(options.db) as store:
            options.run(store, options)
    except KeyStoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return REFUSED
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command's options and subcommands; each subcommand's function is the ``run`` of its options."""
    parser = argparse.ArgumentParser(prog="server.py keys", description="Manage the server's API keys.")
    parser.add_argument("--db", metavar="PATH", default=os.environ.get(DB_ENVIRONMENT_VARIABLE),
                        help=f"the key database (default: ${DB_ENVIRONMENT_VARIABLE})")
    commands = parser.add_subparsers(dest="command", required=True)

    add = commands.add_parser("add", help="make a key and print its secret (shown only once)")
    add.add_argument("name")
    add_limit_options(add)
    add.set_defaults(run=add_key)

    change = commands.add_parser("set", help="change the limits given, keeping the others")
    change.add_argument("name")
    add_limit_options(change)
    change.add_argument("--all-models", action="store_true", help="let the key use every model again")
    change.set_defaults(run=set_limits)

    listing = commands.add_parser("list", help="list the keys, revoked ones too")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=list_keys)

    revoke = commands.add_parser("revoke", help="refuse a key from now on (its name is not reused)")
    revoke.add_argument("name")
    revoke.set_defaults(run=revoke_key)

    usage = commands.add_parser("usage", help="the usage per key, model and UTC day")
    usage.add_argument("name", nargs="?", help="only this key's (or 'anonymous' for clients without a key)")
    usage.add_argument("--days", type=int, default=7, help="this many UTC days, today included (default: 7)")
    usage.add_argument("--json", action="store_true", help="print a JSON array")
    usage.set_defaults(run=print_usage)
    return parser


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """The limit options; one not given is None, so that ``set`` keeps what the key has."""
    parser.add_argument("--requests-per-minute", type=int, metavar="N", help="0: no limit")
    parser.add_argument("--tokens-per-minute", type=int, metavar="N", help="0: no limit")
    parser.add_argument("--sessions", type=int, metavar="N",
                        help="concurrent inference sessions (0: the server's per-client limit)")
    parser.add_argument("--daily-tokens", type=int, metavar="N",
                        help="prompt plus completion tokens per UTC day (0: no limit)")
    parser.add_argument("--model", dest="models", action="append", metavar="KEY",
                        help="a model the key may use (repeat for more; none: every model)")
    parser.add_argument("--weight", type=float, metavar="W",
                        help="its share of the swarm's steps relative to other clients (default 1)")


def limit_changes(options: argparse.Namespace) -> Dict[str, object]:
    """The limits the options give, by KeyLimits field."""
    changes = {field.name: getattr(options, field.name) for field in dataclasses.fields(KeyLimits)
               if getattr(options, field.name) is not None}
    if "models" in changes:
        changes["models"] = tuple(changes["models"])
    return changes


def add_key(store: KeyStore, options: argparse.Namespace) -> None:
    """``add``: makes the key and prints its secret."""
    secret = store.add_key(options.name, KeyLimits(**limit_changes(options)))
    print(secret)
    print(f"the secret of {options.name!r} is shown only this once: keep it now", file=sys.stderr)


def set_limits(store: KeyStore, options: argparse.Namespace) -> None:
    """``set``: changes the limits given and keeps the key's others."""
    changes = limit_changes(options)
    if options.all_models:
        if "models" in changes:
            raise KeyStoreError("--all-models and --model contradict each other")
        changes["models"] = ()
    if not changes:
        raise KeyStoreError("nothing to change: give a limit option")
    current = {record.name: record for record in store.keys(include_revoked=False)}.get(options.name)
    if current is None:
        raise KeyStoreError(f"no active key is named {options.name!r}")
    store.update_limits(options.name, dataclasses.replace(current.limits, **changes))
    print(f"changed the limits of {options.name!r}")


def revoke_key(store: KeyStore, options: argparse.Namespace) -> None:
    """``revoke``: refuses the key from now on."""
    store.revoke(options.name)
    print(f"revoked {options.name!r}")


def list_keys(store: KeyStore, options: argparse.Namespace) -> None:
    """``list``: every key and its limits, revoked ones too."""
    records = store.keys()
    if options.json:
        print(json.dumps([dict(dataclasses.asdict(record), status=status(record)) for record in records], indent=2))
        return
    print_table(("NAME", "PREFIX", "REQ/MIN", "TOKENS/MIN", "SESSIONS", "DAILY TOKENS", "MODELS", "WEIGHT", "STATUS"),
                [(record.name, record.prefix, limit(record.limits.requests_per_minute),
                  limit(record.limits.tokens_per_minute), limit(record.limits.sessions),
                  limit(record.limits.daily_tokens), ",".join(record.limits.models) or "-",
                  f"{record.limits.weight:g}", status(record)) for record in records])


def print_usage(store: KeyStore, options: argparse.Namespace) -> None:
    """``usage``: the usage of the last ``--days`` UTC days, of one key or all."""
    if options.days < 1:
        raise KeyStoreError(f"--days must be 1 or more, not {options.days}")
    rows = store.usage(options.name, since_day=utc_day(time.time() - (options.days - 1) * SECONDS_PER_DAY))
    if options.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
        return
    print_table(("DAY", "KEY", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "SERVERS"),
                [(row.day, row.key, row.model, str(row.requests), str(row.prompt_tokens), str(row.cached_tokens),
                  str(row.completion_tokens), servers_cell(row)) for row in rows])


def status(record: KeyRecord) -> str:
    """Whether the key is active or revoked, in a word."""
    return "active" if record.revoked is None else "revoked"


def limit(value: int) -> str:
    """A limit as a table shows it: "-" for none."""
    return str(value) if value else "-"


def servers_cell(row: UsageRow) -> str:
    """The servers that served the row's generations, most first, by the end of their peer id."""
    served = sorted(row.servers.items(), key=lambda item: (-item[1], item[0]))
    return " ".join(f"{peer[-SHOWN_PEER_ID_LENGTH:]}:{count}" for peer, count in served) or "-"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Prints the rows under the header in columns as wide as their widest cell."""
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
