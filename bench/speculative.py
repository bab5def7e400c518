"""Speculative decoding against plain decoding, through the server's own session manager.

Two setups, the default model (SmolLM2-135M-Instruct, float32) in both:

- **trips**: a swarm of two nodes, each with half of the blocks and ``--added-step-delay``
  seconds slept before each step's reply (a simulated network trip per server, 50 ms by
  default). Four tasks, each greedy, run plain (``speculative=False``) and speculative:
  editing a 40-line file given as ``prediction``, quoting and summarizing a given text, JSON to a
  schema (constrained), and open chat. It prints tokens/s for each and checks that the two runs
  chose the same tokens.
- **local**: the embedded default (one node, no added delay): the quoting task, speculative,
  against plain transformers decoding one token at a time on the same weights.

And the regenerate case: in a conversation of about 2,000 tokens, a request that regenerates
the last reply (the same prompt again, prefix reuse on) gets its first token; compared with the
median time of one decode step.

    .venv/bin/python bench/speculative.py [--tokens 160] [--delay 0.05] [--repeats 1] [--tasks NAME ...]
        [--skip-local] [--skip-trips]
"""

import argparse
import asyncio
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.common import default_model_files, local_swarm  # noqa: E402
from bench.swarm_vs_local import greedy_local  # noqa: E402
from config import Settings  # noqa: E402
from server import split_cpu_threads  # noqa: E402
from sessions.engine.speculation import DRAFT_SOURCES  # noqa: E402
from sessions.requests import GenerationRequest, SamplingParams  # noqa: E402
from sessions.serving.manager import build_manager  # noqa: E402

CODE = "\n".join([
    "import math",
    "",
    "",
    "class Shape:",
    "    \"\"\"A plane figure.\"\"\"",
    "",
    "    def area(self) -> float:",
    "        raise NotImplementedError",
    "",
    "    def perimeter(self) -> float:",
    "        raise NotImplementedError",
    "",
    "",
    "class Circle(Shape):",
    "    def __init__(self, radius: float):",
    "        self.radius = radius",
    "",
    "    def area(self) -> float:",
    "        return math.pi * self.radius ** 2",
    "",
    "    def perimeter(self) -> float:",
    "        return 2 * math.pi * self.radius",
    "",
    "",
    "class Rectangle(Shape):",
    "    def __init__(self, width: float, height: float):",
    "        self.width = width",
    "        self.height = height",
    "",
    "    def area(self) -> float:",
    "        return self.width * self.height",
    "",
    "    def perimeter(self) -> float:",
    "        return 2 * (self.width + self.height)",
    "",
    "",
    "def total_area(shapes: list) -> float:",
    "    return sum(shape.area() for shape in shapes)",
    "",
])
EDITED_HINT = CODE.replace("self.radius", "self.r")

TEXT = ("The lighthouse stood on a rock a mile from the coast. Every evening the keeper climbed the "
        "one hundred and twelve steps to light the lamp, and every morning he climbed them again to "
        "put it out. Ships passed in the night without ever seeing him, and he liked it that way. "
        "In forty years he had missed only one evening, the night of the great storm, when the sea "
        "came over the rock and the door would not open.")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer"},
    "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "city", "age", "hobbies"], "additionalProperties": False}

TASKS = {
    "edit with prediction": dict(
        user="Rename the attribute radius of Circle to r everywhere in this file and reply with the whole "
             "file only, as code:\n\n" + CODE,
        reply_start="```python\n", prediction=EDITED_HINT),
    "quote and summarize": dict(
        user="Quote this text word for word, then summarize it in one sentence.\n\nText: " + TEXT),
    "JSON to a schema": dict(
        user="Describe a made-up person as JSON with the keys name, city, age and hobbies. Example: "
             '{"name": "Ann", "city": "Oslo", "age": 31, "hobbies": ["chess", "skiing"]}',
        schema=SCHEMA),
    "open chat": dict(user="Tell me about the history of bread in a few paragraphs."),
}


def chat_prompt(tokenizer, user: str, reply_start: str = "") -> list:
    """The chat prompt of one user turn, the assistant's reply begun with ``reply_start``."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    return prompt + tokenizer.encode(reply_start, add_special_tokens=False) if reply_start else prompt


async def generate(manager, model: str, prompt_ids: list, tokens: int, speculative: bool,
                   prediction=None, schema=None) -> tuple:
    """One greedy generation in a fresh session; returns (token count, text, seconds, first token seconds)."""
    session = await manager.open_session("bench", model, len(prompt_ids) + tokens + 1, "127.0.0.1")
    sampling = SamplingParams(json_schema=json.dumps(schema) if schema else None)
    request = GenerationRequest(input_ids=tuple(prompt_ids), max_length=len(prompt_ids) + tokens, max_new_tokens=1,
                                until_length=True, sampling=sampling, speculative=speculative,
                                prediction=prediction)
    started, first, text, count = time.perf_counter(), None, "", 0
    try:
        async for update in session.generate(request):
            first = first or time.perf_counter() - started
            text += update.outputs
            count += update.token_count
    finally:
        await session.aclose("bench done")
    return count, text, time.perf_counter() - started, first


def draft_counts(manager, model: str) -> dict:
    """Per draft source, (accepted, drafted) tokens so far, from the server's metrics."""
    metrics = manager.metrics
    return {source: (metrics.accepted_draft_tokens.labels(model, source)._value.get(),
                     metrics.drafted_tokens.labels(model, source)._value.get())
            for source in DRAFT_SOURCES}


def drafts_between(before: dict, after: dict) -> str:
    parts = [f"{source} {after[source][0] - before[source][0]:.0f}/{after[source][1] - before[source][1]:.0f}"
             for source in after if after[source][1] > before[source][1]]
    return ", ".join(parts) or "none"


async def run_tasks(manager, model: str, tokenizer, tokens: int, repeats: int, only=()) -> list:
    """Each task plain then speculative, ``repeats`` times alternating; the median rate of each."""
    rows = []
    for name, task in TASKS.items():
        if only and name not in only:
            continue
        prompt_ids = chat_prompt(tokenizer, task["user"], task.get("reply_start", ""))
        rates, texts, counts = {False: [], True: []}, {}, {}
        before = draft_counts(manager, model)
        for _ in range(repeats):
            for speculative in (False, True):
                count, texts[speculative], seconds, _ = await generate(
                    manager, model, prompt_ids, tokens, speculative, task.get("prediction"), task.get("schema"))
                rates[speculative].append(count / seconds)
                counts[speculative] = count
        rows.append(dict(task=name, tokens=counts[True], plain=statistics.median(rates[False]),
                         speculative=statistics.median(rates[True]), same=texts[False] == texts[True],
                         drafts=drafts_between(before, draft_counts(manager, model))))
    return rows


async def regenerate_first_token(manager, model: str, tokenizer) -> dict:
    """A ~2,000-token chat; its last reply regenerated with prefix reuse on: the first token's
    time against the median time of the reply's next tokens (decode steps at that length)."""
    messages = []
    for turn in range(13):
        messages.append({"role": "user", "content": f"Turn {turn}: " + TEXT})
        messages.append({"role": "assistant", "content": "Noted. " + TEXT[:200]})
    messages.append({"role": "user", "content": "Summarize the story in one sentence."})
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    request = GenerationRequest(input_ids=tuple(prompt_ids), max_new_tokens=1, until_length=True,
                                max_length=len(prompt_ids) + 16, speculative=False)
    firsts, gaps = [], []
    for attempt in range(2):  # the first opens the session, the second regenerates from it
        opened = await manager.open_for_request(f"regenerate-{attempt}", manager.registry.find(model), request,
                                                "bench")
        started, times = time.perf_counter(), []
        async for update in opened.session.generate(opened.request):
            times.append(time.perf_counter() - started)
        manager.finish_request(opened.session, reusable=True, reason="done")
        firsts.append((times[0], opened.cached_tokens))
        gaps += [later - earlier for earlier, later in zip(times, times[1:])]
    return dict(prompt_tokens=len(prompt_ids), fresh_first=firsts[0][0], regenerate_first=firsts[1][0],
                cached=firsts[1][1], decode_step=statistics.median(gaps))


def print_rows(title: str, rows: list) -> None:
    print(f"\n{title}")
    print("| task | tokens | plain tok/s | speculative tok/s | speed-up | same greedy output "
          "| drafts accepted/drafted |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['tokens']} | {row['plain']:.2f} | {row['speculative']:.2f} | "
              f"{row['speculative'] / row['plain']:.2f}x | {'yes' if row['same'] else 'NO'} | {row['drafts']} |")


def manager_for(spec, swarm, warm: bool = False):
    settings = Settings(executor_workers=2, step_timeout=300, draft_tokens=16, warm_sessions=4 if warm else 0)
    return build_manager([spec], swarm.initial_peers, "cpu", "float32", settings=settings)


async def trips(args, spec, path, tokenizer) -> None:
    delay = ("--added-step-delay", str(args.delay))
    node_threads, _ = split_cpu_threads(0)
    threads = max(1, node_threads // 2)
    with tempfile.TemporaryDirectory() as log_dir, \
            local_swarm(spec, path, Path(log_dir), nodes=2, split_blocks=True,  # each node half of the blocks
                        node_options=delay, threads=threads) as (swarm, _, _):
        manager = manager_for(spec, swarm, warm=True)
        await manager.start()
        try:
            await generate(manager, spec.key, chat_prompt(tokenizer, "Hi"), 4, False)  # warm-up
            rows = await run_tasks(manager, spec.key, tokenizer, args.tokens, args.repeats, args.tasks)
            print_rows(f"Two nodes, {args.delay * 1000:.0f} ms added to each server step, {args.tokens} greedy tokens, "
                       f"median of {args.repeats} alternating runs (tokens/s of the whole generation, first step "
                       "included; drafts summed over the runs)", rows)
            regenerate = await regenerate_first_token(manager, spec.key, tokenizer)
            print(f"\nRegenerate the last reply of a {regenerate['prompt_tokens']}-token chat: first token "
                  f"{regenerate['regenerate_first'] * 1000:.0f} ms ({regenerate['cached']} prompt tokens reused), "
                  f"in a fresh session {regenerate['fresh_first'] * 1000:.0f} ms; one decode step there "
                  f"{regenerate['decode_step'] * 1000:.0f} ms (median): "
                  f"{regenerate['regenerate_first'] / regenerate['decode_step']:.2f}x a decode step")
        finally:
            await manager.close()


async def local(args, spec, path, tokenizer) -> None:
    node_threads, client_threads = split_cpu_threads(0)
    torch.set_num_threads(client_threads)
    prompt_ids = chat_prompt(tokenizer, TASKS["quote and summarize"]["user"])
    plain_model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    greedy_local(plain_model, prompt_ids, 4)  # warm-up
    local_ids, local_seconds = greedy_local(plain_model, prompt_ids, args.tokens)
    with tempfile.TemporaryDirectory() as log_dir, \
            local_swarm(spec, path, Path(log_dir), threads=node_threads) as (swarm, _, _):
        manager = manager_for(spec, swarm)
        await manager.start()
        try:
            await generate(manager, spec.key, chat_prompt(tokenizer, "Hi"), 4, False)  # warm-up
            count, text, seconds, _ = await generate(manager, spec.key, prompt_ids, args.tokens, True)
            plain_count, plain_text, plain_seconds, _ = await generate(manager, spec.key, prompt_ids, args.tokens,
                                                                       False)
        finally:
            await manager.close()
    transformers_text = tokenizer.decode(local_ids)
    print(f"\nEmbedded default (one node, no added delay), quoting task, {args.tokens} greedy tokens:")
    print(f"plain transformers {len(local_ids) / local_seconds:.2f} tok/s, "
          f"swarm plain {plain_count / plain_seconds:.2f} tok/s, swarm speculative {count / seconds:.2f} tok/s: "
          f"{(count / seconds) / (len(local_ids) / local_seconds):.2f}x plain transformers; "
          f"same text as transformers: {'yes' if text == transformers_text[:len(text)] else 'NO'}, "
          f"as plain swarm decoding: {'yes' if text == plain_text else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds added to each server step")
    parser.add_argument("--skip-local", action="store_true", help="only the two-node setup with added delay")
    parser.add_argument("--skip-trips", action="store_true", help="only the embedded default setup")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each task (the median is shown)")
    parser.add_argument("--tasks", nargs="*", default=(), choices=list(TASKS), help="only these tasks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec, path = default_model_files()
    spec = dataclasses.replace(spec, dht_prefix="bench-speculative")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not args.skip_trips:
        asyncio.run(trips(args, spec, path, tokenizer))
    if not args.skip_local:
        asyncio.run(local(args, spec, path, tokenizer))


if __name__ == "__main__":
    main()
