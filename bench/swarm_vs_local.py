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
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from config import REPO_ROOT as CONFIG_ROOT  # noqa: E402
from config import default_model
from server import split_cpu_threads  # noqa: E402
from sessions.engine.token_stream import TokenStream  # noqa: E402
from sessions.models import load_model  # noqa: E402
from sessions.requests import SamplingParams  # noqa: E402
from swarm.default_model import ensure_default_model  # noqa: E402
from swarm.local import LocalSwarm, SwarmModel, count_blocks  # noqa: E402

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


@contextlib.contextmanager
def default_model_on_a_local_swarm(question: str) -> Iterator[Tuple[object, object, object, list]]:
    """The default model on a one-node swarm of this machine, connected as the server connects
    (torch threads split between node and client as ``server.py`` splits them): yields its spec,
    its tokenizer, the loaded client and ``question``'s chat prompt as token ids."""
    node_threads, client_threads = split_cpu_threads(0)
    torch.set_num_threads(client_threads)
    spec = default_model(CONFIG_ROOT / ".models")
    path = ensure_default_model(spec.path.parent)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    model = SwarmModel(str(path), spec.swarm_prefix, count_blocks(str(path)))
    with tempfile.TemporaryDirectory() as log_dir, LocalSwarm(Path(log_dir), threads=node_threads) as swarm:
        swarm.add_node(model)
        swarm.wait_until_ready([model])
        loaded = load_model(spec, swarm.initial_peers, device="cpu", torch_dtype="float32")
        try:
            yield spec, tokenizer, loaded, prompt_ids
        finally:
            loaded.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--node-threads", type=int, default=0, help="torch threads in the swarm node (0: as server.py)")
    parser.add_argument("--client-threads", type=int, default=0, help="torch threads here (0: as server.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    node_threads, client_threads = split_cpu_threads(args.node_threads)
    torch.set_num_threads(args.client_threads or client_threads)

    spec = default_model(CONFIG_ROOT / ".models")
    path = ensure_default_model(spec.path.parent)
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": QUESTION}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    local = AutoModelForCausalLM.from_pretrained(path, torch_dtype=getattr(torch, args.torch_dtype)).eval()
    model = SwarmModel(str(path), spec.swarm_prefix, count_blocks(str(path)))
    local_seconds, swarm_seconds = [], []
    with tempfile.TemporaryDirectory() as log_dir, \
            LocalSwarm(Path(log_dir), torch_dtype=args.torch_dtype, threads=node_threads) as running_swarm:
        running_swarm.add_node(model)
        running_swarm.wait_until_ready([model])
        loaded = load_model(spec, running_swarm.initial_peers, device="cpu", torch_dtype=args.torch_dtype)
        try:
            greedy_local(local, prompt_ids, 4)  # warm-up
            greedy_swarm(loaded, prompt_ids, 4)
            # Alternate the two so that load changes on the machine hit both alike.
            for _ in range(args.repeats):
                local_ids, seconds = greedy_local(local, prompt_ids, args.tokens)
                local_seconds.append(seconds)
                swarm_ids, seconds = greedy_swarm(loaded, prompt_ids, args.tokens)
                swarm_seconds.append(seconds)
        finally:
            loaded.close()

    local_rate = args.tokens / statistics.median(local_seconds)
    swarm_rate = args.tokens / statistics.median(swarm_seconds)
    print(f"model: {spec.key} ({model.num_blocks} blocks, {args.torch_dtype}), {args.tokens} greedy tokens, "
          f"median of {args.repeats} runs each, torch threads: client {torch.get_num_threads()}, node {node_threads}")
    print(f"plain transformers : {local_rate:6.2f} tokens/s")
    print(f"embedded swarm     : {swarm_rate:6.2f} tokens/s")
    print(f"ratio swarm/local  : {swarm_rate / local_rate:6.2f}x   (same tokens: {local_ids == swarm_ids})")


if __name__ == "__main__":
    main()
