"""What the APIs agents use cost through the swarm: one server process on a local swarm serving the
default model, driven by the official ``openai`` client, one section per API feature.

- **choices**: the latency of a whole chat reply of ``n=4`` choices (the rows of one session)
  against ``n=1`` (as served: with drafts, and without), the same prompt and ``max_tokens``
  (sampled, seeded; the prompt asks for more than that), alternating, medians; the goal is within
  1.3x of ``n=1`` as served.

Each section is a function of the running server (``Served``), named in ``SECTIONS``; ``--sections``
picks some (all by default).

    .venv/bin/python bench/agent_apis.py [--sections choices] [--repeats 5] [--max-tokens 48] [--delay 0]
"""

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import openai  # noqa: E402

from bench.common import default_model_files, local_swarm, start_server, stop_server  # noqa: E402
from model_specs import model_from_source  # noqa: E402

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
CHOICES = 4


@dataclass
class Served:
    """The running server a section measures: its ``/v1`` address, the model's name there, the options."""

    base_url: str
    model: str
    args: argparse.Namespace

    def client(self) -> openai.AsyncOpenAI:
        """An official client of the server (no retries: a failure shows)."""
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=600)


async def whole_reply(served: Served, n: int, seed: int, speculative: bool = True) -> Tuple[float, int]:
    """Seconds for a whole (not streamed) chat reply of ``n`` choices, and its completion tokens."""
    client = served.client()
    try:
        started = time.perf_counter()
        reply = await client.chat.completions.create(
            model=served.model, messages=STORY, n=n, temperature=0.8, seed=seed, max_tokens=served.args.max_tokens,
            extra_body={"speculative": speculative})
        seconds = time.perf_counter() - started
    finally:
        await client.close()
    assert len(reply.choices) == n
    return seconds, reply.usage.completion_tokens


async def choices(served: Served) -> None:
    """``n=4`` against ``n=1``: the whole reply's latency, alternating runs, medians and their ratios."""
    variants = {"n=1": (1, True), "n=1, no drafts": (1, False), f"n={CHOICES}": (CHOICES, True)}
    for n, speculative in variants.values():  # warm-up: the first sessions and their route
        await whole_reply(served, n, 0, speculative)
    runs: Dict[str, List[Tuple[float, int]]] = {name: [] for name in variants}
    for repeat in range(served.args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))  # alternating which goes first
        for name in order:
            n, speculative = variants[name]
            runs[name].append(await whole_reply(served, n, 1 + repeat, speculative))
    print(f"whole chat reply, up to {served.args.max_tokens} tokens per choice, temperature 0.8, "
          f"median of {served.args.repeats} alternating runs")
    medians = {}
    for name, timed in runs.items():
        medians[name] = statistics.median(seconds for seconds, _ in timed)
        tokens = sum(count for _, count in timed)
        print(f"  {name:>14}: {1000 * medians[name]:7.0f} ms, {tokens / len(timed) / variants[name][0]:5.1f} tokens "
              f"per choice, {tokens / sum(seconds for seconds, _ in timed):6.2f} tokens/s in all")
    for baseline in ("n=1", "n=1, no drafts"):
        print(f"  latency n={CHOICES} / {baseline}: {medians[f'n={CHOICES}'] / medians[baseline]:.2f}x"
              + ("   (goal: within 1.30x)" if baseline == "n=1" else ""))


SECTIONS: Dict[str, Callable[[Served], Awaitable[None]]] = {"choices": choices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds the swarm node sleeps before each step's reply (a simulated network trip)")
    parser.add_argument("--port", type=int, default=5125)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    spec, path = default_model_files()
    node_options = ["--added-step-delay", str(args.delay)] if args.delay else []
    with tempfile.TemporaryDirectory() as logs, \
            local_swarm(spec, path, Path(logs), node_options=node_options) as (running_swarm, _, _):
        server, _ = start_server(path, running_swarm.initial_peers, Path(logs) / "server.log", port=args.port)
        try:
            served = Served(f"http://127.0.0.1:{args.port}/v1", model_from_source(str(path)).key, args)
            print(f"model: {spec.key} on a local swarm of one node"
                  + (f", {1000 * args.delay:.0f} ms added to each step" if args.delay else ""))
            for name in args.sections:
                print(f"\n[{name}]")
                asyncio.run(SECTIONS[name](served))
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
