"""Greedy decoding speed of the default model: through the embedded swarm vs plain transformers.

Both run the same weights (float32 unless --torch-dtype says otherwise) on this machine, in one run, one after the other, one
forward pass per token: plain transformers with its KV cache, and the server's own
``TokenStream`` (one Petals inference session, one step through the node per token).
Prints tokens/s for each, their ratio, and whether both chose the same tokens.

    .venv/bin/python bench/swarm_vs_local.py [--tokens 64] [--repeats 3] [--torch-dtype float32|bfloat16]
        [--node-threads N] [--client-threads N]
"""

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.common import default_model_on_a_local_swarm  # noqa: E402
from sessions.engine.token_stream import TokenStream  # noqa: E402
from sessions.requests import SamplingParams  # noqa: E402

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def greedy_local(model, prompt_ids, new_tokens: int) -> tuple:
    """Plain transformers with its own KV cache, one forward pass per token; returns (ids, seconds)."""
    started = time.perf_counter()
    with torch.inference_mode():
        tokens, past, feed = [], None, torch.tensor([prompt_ids])
        for _ in range(new_tokens):
            output = model(feed, past_key_values=past, use_cache=True)
            past = output.past_key_values
            tokens.append(int(output.logits[0, -1].argmax()))
            feed = torch.tensor([[tokens[-1]]])
    return tokens, time.perf_counter() - started


def greedy_swarm(loaded, prompt_ids, new_tokens: int, sampling: SamplingParams = SamplingParams()) -> tuple:
    """The server's own path: one TokenStream step per token through the swarm; returns (ids, seconds)."""
    stream = TokenStream(loaded, max_length=len(prompt_ids) + new_tokens + 1)
    asyncio.run(stream.prepare(sampling))  # a schema or grammar is compiled before the first step, as the server does
    started = time.perf_counter()
    try:
        tokens = stream.step(prompt_ids, sampling)  # without a draft, each step chooses one token
        while len(tokens) < new_tokens:
            tokens += stream.step((), sampling)
    finally:
        stream.close()
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--node-threads", type=int, default=0, help="torch threads in the swarm node (0: as server.py)")
    parser.add_argument("--client-threads", type=int, default=0, help="torch threads here (0: as server.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    local_seconds, swarm_seconds = [], []
    with default_model_on_a_local_swarm(QUESTION, args.torch_dtype, args.node_threads,
                                        args.client_threads) as swarm:
        prompt_ids = swarm.prompt_ids
        local = AutoModelForCausalLM.from_pretrained(swarm.path, torch_dtype=getattr(torch, args.torch_dtype)).eval()
        greedy_local(local, prompt_ids, 4)  # warm-up
        greedy_swarm(swarm.loaded, prompt_ids, 4)
        # Alternate the two so that load changes on the machine hit both alike.
        for _ in range(args.repeats):
            local_ids, seconds = greedy_local(local, prompt_ids, args.tokens)
            local_seconds.append(seconds)
            swarm_ids, seconds = greedy_swarm(swarm.loaded, prompt_ids, args.tokens)
            swarm_seconds.append(seconds)

    local_rate = args.tokens / statistics.median(local_seconds)
    swarm_rate = args.tokens / statistics.median(swarm_seconds)
    print(f"model: {swarm.spec.key} ({swarm.model.num_blocks} blocks, {args.torch_dtype}), {args.tokens} greedy "
          f"tokens, median of {args.repeats} runs each, torch threads: client {torch.get_num_threads()}, "
          f"node {swarm.node_threads}")
    print(f"plain transformers : {local_rate:6.2f} tokens/s")
    print(f"embedded swarm     : {swarm_rate:6.2f} tokens/s")
    print(f"ratio swarm/local  : {swarm_rate / local_rate:6.2f}x   (same tokens: {local_ids == swarm_ids})")


if __name__ == "__main__":
    main()
