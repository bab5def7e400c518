"""What the APIs agents use cost through the swarm: one server process on a local swarm serving the
default model, driven by the official ``openai`` client, one section per API feature.

- **choices**: the latency of a whole chat reply of ``n=4`` choices (the rows of one session)
  against ``n=1`` (as served: with drafts, and without), the same prompt and ``max_tokens``
  (sampled, seeded; the prompt asks for more than that), alternating, medians; the goal is within
  1.3x of ``n=1`` as served.

- **responses**: a Responses API conversation of ``--turns`` turns (8), each continuing the one
  before by ``previous_response_id``, streamed: each turn's time to its first text, and the prompt
  tokens it fed (``input_tokens - cached_tokens``) against the tokens the conversation grew by since
  the turn before's reply (plus that reply's last token, chosen but never fed); the goal is the last
  turn's first text within 1.3x of the first's, and nothing fed twice.

Each section is a function of the running server (``Served``), named in ``SECTIONS``; ``--sections``
picks some (all by default).

    .venv/bin/python bench/agent_apis.py [--sections choices responses] [--repeats 5] [--max-tokens 48]
        [--turns 8] [--delay 0]
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


TURNS = ["What is the capital of France?", "And of Italy?", "Which of the two is older?", "Name a river in each.",
         "Which river is longer?", "Name a famous bridge over it.", "When was it built?", "Thank you! Summarize."]


async def streamed_turn(client: openai.AsyncOpenAI, served: Served, text: str, previous: str = None):
    """One streamed turn: seconds to its first text (or call), and the final response."""
    started = time.perf_counter()
    first = None
    async with client.responses.stream(
            model=served.model, instructions="Answer in one short sentence.", input=text, temperature=0,
            max_output_tokens=served.args.max_tokens, previous_response_id=previous) as stream:
        async for event in stream:
            if first is None and event.type in ("response.output_text.delta",
                                                "response.function_call_arguments.delta"):
                first = time.perf_counter() - started
        response = await stream.get_final_response()
    return first, response


async def responses(served: Served) -> None:
    """A conversation chained by ``previous_response_id``: first-text time and tokens fed per turn."""
    client = served.client()
    try:
        await streamed_turn(client, served, "Hello!")  # warm-up: the first session and its route
        rows, previous, grown_from = [], None, None
        for turn in range(served.args.turns):
            first, response = await streamed_turn(client, served, TURNS[turn % len(TURNS)], previous)
            usage = response.usage
            fed = usage.input_tokens - usage.input_tokens_details.cached_tokens
            new = usage.input_tokens if grown_from is None else usage.input_tokens - grown_from + 1
            rows.append((turn + 1, first, usage.input_tokens, usage.input_tokens_details.cached_tokens, fed, new,
                         usage.output_tokens))
            previous, grown_from = response.id, usage.input_tokens + usage.output_tokens
    finally:
        await client.close()
    print(f"a conversation of {served.args.turns} streamed turns, each continuing the one before by "
          f"previous_response_id; temperature 0, up to {served.args.max_tokens} tokens a reply")
    print("  turn  first text   input  cached  fed  new  output")
    for turn, first, input_tokens, cached, fed, new, output in rows:
        print(f"  {turn:>4}  {1000 * first:7.0f} ms  {input_tokens:>6}  {cached:>6}  {fed:>3}  {new:>3}  {output:>6}")
    print(f"  first text, turn {rows[-1][0]} / turn 1: {rows[-1][1] / rows[0][1]:.2f}x   (goal: within 1.30x)")
    print(f"  turns whose fed tokens equal the new ones: {sum(fed == new for _, _, _, _, fed, new, _ in rows)} "
          f"of {len(rows)}")


SECTIONS: Dict[str, Callable[[Served], Awaitable[None]]] = {"choices": choices, "responses": responses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--turns", type=int, default=8, help="turns of the responses section's conversation")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds the swarm node sleeps before each step's reply (a simulated network trip)")
    parser.add_argument("--port", type=int, default=5125)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec, path = default_model_files()
    node_options = ["--added-step-delay", str(args.delay)] if args.delay else []
    with tempfile.TemporaryDirectory() as logs, \
            local_swarm(spec, path, Path(logs), node_options=node_options) as (running_swarm, _, _):
        server, _ = start_server(path, running_swarm.initial_peers, Path(logs) / "server.log", port=args.port)
        try:
            logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise (set once petals logs)
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
