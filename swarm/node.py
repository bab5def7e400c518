"""One Petals server node: ``python -m swarm serve MODEL [options]``.

A thin front for petals' own ``run_server`` that runs through the compatibility layer,
accepts ``--dash-style`` as well as petals' ``--underscore_style`` options, derives the DHT
prefix by the clients' rule (``swarm.prefix``), lets a session's step start at an earlier
position (``swarm.rollback``), and shuts down cleanly on SIGTERM as on Ctrl-C
(so the node's own child processes, its DHT and p2p daemon, go with it).
"""

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Sequence

from swarm.prefix import dht_prefix_for

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0


def petals_argv(model: str, options: Sequence[str]) -> List[str]:
    """Petals' run_server argv for ``model`` and pass-through ``options`` (dashes become underscores)."""
    translated = []
    for option in options:
        if option.startswith("--"):
            name, sep, value = option.partition("=")
            option = "--" + name[2:].replace("-", "_") + sep + value
        translated.append(option)
    if not any(opt.split("=")[0] == "--dht_prefix" for opt in translated):
        translated += ["--dht_prefix", dht_prefix_for(str(Path(model).resolve()) if Path(model).is_dir() else model)]
    return [model, *translated]


def _end_descendants() -> None:
    import psutil

    descendants = psutil.Process().children(recursive=True)
    for process in descendants:
        process.terminate()
    _, alive = psutil.wait_procs(descendants, timeout=3)
    for process in alive:
        process.kill()


def _exit_now(status: int) -> None:
    """Ends the node's helper processes and exits without waiting for petals' worker threads."""
    _end_descendants()
    logging.shutdown()
    os._exit(status)


def _restore_default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _start_shutdown(signum, frame):
    # petals' shutdown can stall on its own threads: give it SHUTDOWN_GRACE seconds, then end it.
    watchdog = threading.Timer(SHUTDOWN_GRACE, _exit_now, args=(1,))
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt


def serve(argv: Sequence[str]) -> None:
    """Runs a Petals server node until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m swarm serve",
        description="Run one Petals server node. Options after MODEL are petals' run_server options, "
        "e.g. --initial-peers ADDR, --new-swarm, --num-blocks N, --block-indices 0:16, --port P, "
        "--device cuda, --torch-dtype float16 (see: python -m petals.cli.run_server --help).",
    )
    parser.add_argument("model", help="hub repository or local folder of the model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for this node (0: automatic)")
    parser.add_argument("--without-rollback", action="store_true",
                        help="serve steps as a stock petals 2.2 node does: no step may start at an earlier position "
                        "(for testing clients against such nodes)")
    parser.add_argument("--added-step-delay", type=float, default=0.0, metavar="SECONDS",
                        help="sleep this long before each inference step's reply: a simulated network trip, "
                        "for benchmarks")
    args, rest = parser.parse_known_args(argv)

    signal.signal(signal.SIGTERM, _start_shutdown)
    signal.signal(signal.SIGINT, _start_shutdown)
    # Forked helpers (the node's DHT process) keep the defaults: multiprocessing ends them with SIGTERM.
    os.register_at_fork(after_in_child=_restore_default_signals)
    import swarm.petals_api  # noqa: F401  (must precede petals; registers our model families)
    import torch
    from swarm.rollback import serve_added_delay_only, serve_rollback

    if args.added_step_delay < 0:
        parser.error("--added-step-delay must be 0 or more")
    if args.without_rollback:
        if args.added_step_delay:
            serve_added_delay_only(args.added_step_delay)
    else:
        serve_rollback(args.added_step_delay)
    from petals.cli import run_server

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sys.argv = ["petals.cli.run_server", *petals_argv(args.model, rest)]
    logger.info("Starting a Petals node: %s", " ".join(sys.argv[1:]))
    try:
        run_server.main()
    except Exception:
        logger.exception("The node failed")
        _exit_now(1)
    # petals leaves non-daemon threads behind that would keep the interpreter alive.
    _exit_now(0)
