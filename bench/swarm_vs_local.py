"""Greedy decoding speed of the default model: through the embedded swarm vs plain transformers.

Both run the same float32 weights on this machine, in one run, one after the other, through
transformers' ``generate`` (the swarm's inside one Petals inference session, so each token is
one step through the node). Prints tokens/s for each and their ratio.

    .venv/bin/python bench/swarm_vs_local.py [--tokens 64] [--node-threads N] [--client-threads N]
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import swarm.compat  # noqa: E402,F401  (must precede petals)
import torch  # noqa: E402
from petals import AutoDistributedModelForCausalLM  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from config import REPO_ROOT as CONFIG_ROOT, default_model  # noqa: E402
from sessions.models import LoadedModel  # noqa: E402
from swarm.default_model import ensure_default_model  # noqa: E402
from swarm.local import LocalSwarm, SwarmModel, count_blocks  # noqa: E402

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def timed_greedy(model, input_ids, new_tokens: int) -> tuple:
    """Greedy generation of exactly ``new_tokens`` tokens; returns (ids, seconds)."""
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return output, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--node-threads", type=int, default=0, help="torch threads in the swarm node (0: auto)")
    parser.add_argument("--client-threads", type=int, default=0, help="torch threads in this process (0: auto)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.client_threads:
        torch.set_num_threads(args.client_threads)

    spec = default_model(CONFIG_ROOT / ".models")
    path = ensure_default_model(spec.path.parent)
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": QUESTION}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

    local = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    timed_greedy(local, input_ids, 4)  # warm-up
    local_ids, local_seconds = timed_greedy(local, input_ids, args.tokens)
    del local

    model = SwarmModel(str(path), spec.dht_prefix, count_blocks(str(path)))
    with tempfile.TemporaryDirectory() as log_dir, LocalSwarm(Path(log_dir), threads=args.node_threads) as swarm:
        swarm.add_node(model)
        swarm.wait_until_ready([model])
        client = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, dht_prefix=spec.dht_prefix, torch_dtype=torch.float32)
        client.eval()
        timed_greedy(client, input_ids, 4)  # warm-up
        swarm_ids, swarm_seconds = timed_greedy(client, input_ids, args.tokens)
        LoadedModel(spec=spec, tokenizer=tokenizer, client=client, device="cpu").close()

    local_rate, swarm_rate = args.tokens / local_seconds, args.tokens / swarm_seconds
    same = torch.equal(local_ids, swarm_ids)
    print(f"model: {spec.key} ({model.num_blocks} blocks, float32), {args.tokens} greedy tokens, "
          f"torch threads: client {torch.get_num_threads()}, node {args.node_threads or 'auto'}")
    print(f"plain transformers : {local_rate:6.2f} tokens/s")
    print(f"embedded swarm     : {swarm_rate:6.2f} tokens/s")
    print(f"ratio swarm/local  : {swarm_rate / local_rate:6.2f}x   (same tokens: {same})")


if __name__ == "__main__":
    main()
