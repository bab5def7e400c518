"""Decoding speed with route tracing against without it, on the default model.

Both run the server's own ``TokenStream`` through an embedded swarm node on this machine, the
same greedy tokens from the same chat prompt, alternating: as the server runs (each server's
part of each step timed into the session's route trace), and with the trace's recording
replaced by a context that does nothing. Prints tokens/s for each, their ratio (the target is
at least 0.98x) and the trace of the last traced run. Since a step's time through the swarm
varies far more than tracing could change it, it also times the tracing alone: a server step
that does nothing, wrapped as petals' is, called with a trace recording and without.

    .venv/bin/python bench/route_trace.py [--tokens 64] [--repeats 5]
"""

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import sessions.engine.token_stream  # noqa: E402
from bench.common import default_model_on_a_local_swarm  # noqa: E402
from sessions.engine.token_stream import TokenStream  # noqa: E402
from swarm.route_trace import RouteRecorder, trace_server_steps  # noqa: E402

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


TRACED = sessions.engine.token_stream.recording


def untraced(recorder: RouteRecorder):
    """Stands in for ``recording``: server steps run outside any trace."""
    return contextlib.nullcontext()


def timed_run(loaded, prompt_ids, tokens: int, traced: bool) -> tuple:
    """(seconds, its route trace) of one greedy run through a ``TokenStream``, traced as the server
    runs or not at all."""
    sessions.engine.token_stream.recording = TRACED if traced else untraced
    stream = TokenStream(loaded, max_length=len(prompt_ids) + tokens + 1)
    started = time.perf_counter()
    try:
        stream.step(prompt_ids)
        for _ in range(tokens - 1):
            stream.step()
    finally:
        stream.close()
    return time.perf_counter() - started, stream.route.summary()


class _IdleServerSession:
    """Stands in for petals' per-server session: a step that does no work."""

    def __init__(self, peer_id):
        self.span = type("Span", (), {"peer_id": peer_id, "start": 0, "end": 30})()

    def step(self, inputs, prompts, hypo_ids, *, step_id):
        return inputs


def tracing_cost_per_step(peer_id, calls: int = 20000) -> float:
    """Seconds tracing adds to one step of a one-server route (the server step's wrapper and the
    step's ``recording``), from ``calls`` idle steps with and without a trace."""
    trace_server_steps(_IdleServerSession)
    session, recorder = _IdleServerSession(peer_id), RouteRecorder()

    def run(traced: bool) -> float:
        context = TRACED if traced else untraced
        started = time.perf_counter()
        for _ in range(calls):
            with context(recorder):
                session.step(None, None, None, step_id="")
        return time.perf_counter() - started

    on = min(run(True) for _ in range(3))
    off = min(run(False) for _ in range(3))
    return (on - off) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seconds = {True: [], False: []}
    with default_model_on_a_local_swarm(QUESTION) as swarm:
        spec, loaded, prompt_ids = swarm.spec, swarm.loaded, swarm.prompt_ids
        timed_run(loaded, prompt_ids, 4, traced=True)  # warm-up
        peer_id = loaded.sequence_manager.state.sequence_info.spans_by_priority[0].peer_id
        for repeat in range(args.repeats):  # alternating, so that load on the machine hits both alike
            for traced in ((True, False) if repeat % 2 == 0 else (False, True)):
                elapsed, trace = timed_run(loaded, prompt_ids, args.tokens, traced)
                seconds[traced].append(elapsed)
                if traced:
                    last_trace = trace
    traced_rate = args.tokens / statistics.median(seconds[True])
    untraced_rate = args.tokens / statistics.median(seconds[False])
    print(f"model: {spec.key}, {args.tokens} greedy tokens, median of {args.repeats} alternating runs each")
    print(f"route tracing on  : {traced_rate:6.2f} tokens/s")
    print(f"route tracing off : {untraced_rate:6.2f} tokens/s")
    print(f"ratio on/off      : {traced_rate / untraced_rate:6.3f}x   (target: at least 0.98x)")
    print("seconds per run, on: " + ", ".join(f"{value:.2f}" for value in seconds[True])
          + "; off: " + ", ".join(f"{value:.2f}" for value in seconds[False]))
    print(f"last trace: {json.dumps(last_trace)}")
    cost = tracing_cost_per_step(peer_id)
    step = statistics.median(seconds[True] + seconds[False]) / args.tokens
    print(f"tracing alone     : {1e6 * cost:.1f} us per step, {1000 * step:.0f} ms per step here: "
          f"{1 - cost / step:.4f}x the untraced speed")


if __name__ == "__main__":
    main()
