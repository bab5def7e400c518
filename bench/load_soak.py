"""Load and soak of the WebSocket API: many active streams at once, then many sessions opened and closed.

Starts a local swarm hosting a tiny Llama (4 blocks, so the figures show the server, not
compute) and ``server.py`` as a separate process with session limits raised above the load
(every client comes from 127.0.0.1), then runs two phases against 127.0.0.1 only:

- load: ``--streams`` clients, each streaming generations back to back (one token per reply)
  for ``--seconds``; counts tokens and errors, per-token latency p50/p99, tokens/s.
- soak: ``--sessions`` short sessions (connect, open, one generate of ``--soak-tokens``
  tokens, close), ``--batch`` at a time; the server process's RSS, threads and open file
  descriptors and its open-session gauge before and after (after the sessions are released
  and ``--settle`` seconds more), and sessions/s.

Prints a table of figures and goals, and exits with status 1 if a goal is missed: any error,
a session, thread or file descriptor left behind, or RSS growth of ``--max-rss-growth-mb`` or
more. ``--streams 0`` or ``--sessions 0`` skips a phase.

    .venv/bin/python bench/load_soak.py [--streams 200] [--seconds 60] [--sessions 10000] [--batch 50]
"""

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import local_swarm, log_tail, start_server, stop_server, tiny_llama_files  # noqa: E402
from bench.load_clients import (  # noqa: E402
    PROMPT_TOKEN_ALLOWANCE,
    LoadResult,
    ProcessSample,
    SoakResult,
    run_load,
    run_soak,
    scrape_open_sessions,
    wait_for_no_open_sessions,
)

MB = 1024 * 1024


def attention_cache_tokens(args: argparse.Namespace) -> int:
    """Tokens of attention cache the node needs: every session of both phases at full length, twice
    over (a closed session's cache is freed in the background while its stream opens the next)."""
    load_tokens = args.streams * args.session_length
    soak_tokens = args.batch * (PROMPT_TOKEN_ALLOWANCE + args.soak_tokens)
    return max(16384, 2 * (load_tokens + soak_tokens))


def check(passed: bool) -> str:
    """The result column of the figures table."""
    return "ok" if passed else "MISSED"


class Report:
    """The figures table: one row per figure, with its goal and whether it was met."""

    def __init__(self) -> None:
        self.rows: List[Tuple[str, str, str, str]] = []
        self.missed: List[str] = []

    def add(self, figure: str, value: str, goal: str = "", passed: Optional[bool] = None) -> None:
        """A row; ``passed`` False marks a missed goal."""
        self.rows.append((figure, value, goal, "" if passed is None else check(passed)))
        if passed is False:
            self.missed.append(figure)

    def print(self) -> None:
        """Prints the table."""
        widths = [max(len(row[column]) for row in self.rows + [("figure", "value", "goal", "")])
                  for column in range(4)]
        for row in [("figure", "value", "goal", "")] + self.rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def report_errors(report: Report, phase: str, errors) -> None:
    """The phase's error count as a goal, and each kind of error seen."""
    report.add(f"{phase}: errors", str(sum(errors.values())), "0", not errors)
    for description, count in errors.most_common(5):
        report.add(f"  {count} x", description)


def report_load(report: Report, load: LoadResult, open_after: int) -> None:
    """The load phase's rows."""
    report.add("load: streams x seconds", f"{load.streams} x {load.seconds:.1f} s")
    report.add("load: streams that got tokens", str(load.streams_with_tokens), str(load.streams),
               load.streams_with_tokens == load.streams)
    report.add("load: tokens", str(load.tokens))
    report.add("load: tokens/s", f"{load.tokens_per_s:.1f}")
    report.add("load: per-token latency p50 / p99", f"{load.p50_ms:.0f} / {load.p99_ms:.0f} ms")
    report.add("load: sessions, generations", f"{load.sessions}, {load.generations}")
    report_errors(report, "load", load.errors)
    report.add("load: open sessions after", str(open_after), "0", open_after == 0)


def report_soak(report: Report, soak: SoakResult, open_after: int, before: ProcessSample, after: ProcessSample,
                node_before: ProcessSample, node_after: ProcessSample, args: argparse.Namespace) -> None:
    """The soak phase's rows."""
    report.add("soak: sessions completed", f"{soak.completed} of {soak.requested}", str(soak.requested),
               soak.completed == soak.requested)
    report.add("soak: seconds, sessions/s", f"{soak.seconds:.1f} s, {soak.sessions_per_s:.1f}/s")
    report_errors(report, "soak", soak.errors)
    report.add("soak: open sessions after", str(open_after), "0", open_after == 0)
    growth_mb = (after.rss_bytes - before.rss_bytes) / MB
    report.add("soak: server RSS before / after", f"{before.rss_bytes / MB:.1f} / {after.rss_bytes / MB:.1f} MB "
               f"({growth_mb:+.1f})", f"< +{args.max_rss_growth_mb} MB", growth_mb < args.max_rss_growth_mb)
    report.add("soak: server threads before / after", f"{before.threads} / {after.threads}",
               "no growth", after.threads <= before.threads)
    report.add("soak: server fds before / after", f"{before.fds} / {after.fds}", "no growth",
               after.fds <= before.fds)
    report.add("soak: swarm node RSS before / after", f"{node_before.rss_bytes / MB:.1f} / "
               f"{node_after.rss_bytes / MB:.1f} MB ({(node_after.rss_bytes - node_before.rss_bytes) / MB:+.1f})")


async def settle(base_url: str, seconds: float, timeout: float) -> int:
    """Waits until the server holds no session, then ``seconds`` more; returns the open sessions."""
    open_sessions = await wait_for_no_open_sessions(lambda: scrape_open_sessions(base_url), timeout)
    await asyncio.sleep(seconds)
    return open_sessions


async def run_phases(base_url: str, model: str, server_pid: int, node_pid: int,
                     args: argparse.Namespace) -> Report:
    """Runs the phases against the server at ``base_url``; returns the figures."""
    url = base_url.replace("http://", "ws://").rstrip("/") + "/api/v2/generate"
    report = Report()
    warm_up = await run_soak(url, model, args.batch, args.batch, args.soak_tokens, args.reply_timeout)
    report_errors(report, "warm-up", warm_up.errors)
    start = ProcessSample.of(server_pid)
    report.add("server RSS, threads, fds after warm-up", f"{start.rss_bytes / MB:.1f} MB, {start.threads}, {start.fds}")
    if args.streams:
        print(f"load: {args.streams} streams for {args.seconds:g} s", flush=True)
        load = await run_load(url, model, args.streams, args.seconds, args.session_length,
                              args.tokens_per_generate, args.reply_timeout)
        report_load(report, load, await settle(base_url, 0, args.settle_timeout))
    if args.sessions:
        # "before" comes after the warm-up and the load: lazily started threads and pools exist.
        await settle(base_url, args.settle, args.settle_timeout)
        before, node_before = ProcessSample.of(server_pid), ProcessSample.of(node_pid)
        print(f"soak: {args.sessions} sessions, {args.batch} at a time", flush=True)
        soak = await run_soak(url, model, args.sessions, args.batch, args.soak_tokens, args.reply_timeout,
                              args.soak_time_limit)
        open_after = await settle(base_url, args.settle, args.settle_timeout)
        after, node_after = ProcessSample.of(server_pid), ProcessSample.of(node_pid)
        report_soak(report, soak, open_after, before, after, node_before, node_after, args)
    return report


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams of the load phase (0: skip)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load phase")
    parser.add_argument("--session-length", type=int, default=256,
                        help="max_length of a load stream's session (full: the stream opens another)")
    parser.add_argument("--tokens-per-generate", type=int, default=16, help="tokens of each streamed generate")
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions of the soak phase (0: skip)")
    parser.add_argument("--batch", type=int, default=50, help="soak sessions at a time")
    parser.add_argument("--soak-tokens", type=int, default=2, help="tokens generated in each soak session")
    parser.add_argument("--soak-time-limit", type=float, default=1800.0,
                        help="seconds after which the soak starts no new session")
    parser.add_argument("--reply-timeout", type=float, default=60.0, help="longest wait for any one reply")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to wait once every session is released, before sampling the server")
    parser.add_argument("--settle-timeout", type=float, default=60.0,
                        help="longest wait for the server to release every session")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0, help="the soak's RSS growth goal")
    parser.add_argument("--executor-workers", type=int, default=None,
                        help="the server's --executor-workers (default: the server's own)")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="keep the server's and the swarm's logs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.session_length < PROMPT_TOKEN_ALLOWANCE + args.tokens_per_generate:
        parser.error(f"--session-length must be at least {PROMPT_TOKEN_ALLOWANCE} + --tokens-per-generate")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    """Runs the bench; returns the exit status."""
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    with tempfile.TemporaryDirectory() as workdir:
        log_dir = args.log_dir or Path(workdir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        spec, model_path = tiny_llama_files(Path(workdir))
        node_options = ["--attn-cache-tokens", str(attention_cache_tokens(args))]
        with local_swarm(spec, model_path, log_dir, node_options=node_options) as (running_swarm, _, (node,)):
            server_log = log_dir / "server.log"
            server, base_url = start_server(model_path, running_swarm.initial_peers, server_log,
                                            executor_workers=args.executor_workers)
            try:
                print(f"server pid {server.pid} at {base_url}, swarm node pid {node.process.pid}", flush=True)
                report = asyncio.run(run_phases(base_url, spec.key, server.pid, node.process.pid, args))
            finally:
                stop_server(server)
        report.print()
        if report.missed:
            print(f"goals missed: {', '.join(report.missed)}")
            print(f"last lines of {server_log}:\n{log_tail(server_log)}")
            return 1
    print("every goal met")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
