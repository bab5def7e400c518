"""Command line of the swarm side: ``python -m swarm serve MODEL [options]``."""

import logging
import sys

from swarm.node import serve

USAGE = "usage: python -m swarm serve MODEL [options]   (python -m swarm serve --help for options)"


def main(argv=None) -> int:
    """Dispatches the subcommand; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "serve":
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
