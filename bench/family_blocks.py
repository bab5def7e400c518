"""Our family block against petals' own Llama block, on the default model's real weights.

SmolLM2 (a Llama) used to run on petals' ``WrappedLlamaBlock``; every Llama now runs on our
``DecoderBlock`` (``swarm/families/block.py``). This measures both, side by side in one run, on
one of the default model's blocks: the time of an inference step of 1 and of 16 new tokens after
a cache of ``--past`` tokens, in petals' cache layout, and the largest difference between their
outputs.

    .venv/bin/python bench/family_blocks.py [--past 0,128,1024] [--repeats 200] [--threads 1]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import swarm.petals_api  # noqa: E402,F401  (must precede petals)
import torch  # noqa: E402
from petals.models.llama.block import WrappedLlamaBlock  # noqa: E402
from petals.utils.auto_config import AutoDistributedConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from swarm.default_model import DEFAULT_CACHE_DIR, ensure_default_model  # noqa: E402

BLOCK_INDEX = 10


def _blocks(folder: Path):
    ours_config = AutoDistributedConfig.from_pretrained(folder)
    petals_config = LlamaConfig.from_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    prefix = f"model.layers.{BLOCK_INDEX}."
    state = {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}
    ours, theirs = ours_config.block_class(ours_config), WrappedLlamaBlock(petals_config)
    ours.load_state_dict(state)
    theirs.load_state_dict(state, strict=False)  # petals' block also holds its rotary tables as buffers
    return ours.eval(), theirs.eval(), ours_config


def _cache(config, past: int):
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    return (torch.randn(kv_heads, head_dim, past), torch.randn(kv_heads, past, head_dim))


def _time(block, hidden, cache, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            block(hidden, layer_past=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--past", default="0,128,1024", help="cache lengths before the step, comma-separated")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, theirs, config = _blocks(ensure_default_model(DEFAULT_CACHE_DIR))
    print(f"SmolLM2-135M block {BLOCK_INDEX}, float32, {args.threads} thread(s), median of {args.repeats} steps")
    print(f"{'past':>6} {'new':>4} {'ours ms':>9} {'petals ms':>10} {'ratio':>6} {'max |diff|':>11}")
    for past in (int(value) for value in args.past.split(",")):
        for new in (1, 16):
            hidden = torch.randn(1, new, config.hidden_size)
            cache = _cache(config, past)
            with torch.inference_mode():
                difference = (ours(hidden, layer_past=cache, use_cache=True)[0]
                              - theirs(hidden, layer_past=cache, use_cache=True)[0]).abs().max().item()
            ours_ms, theirs_ms = _time(ours, hidden, cache, args.repeats), _time(theirs, hidden, cache, args.repeats)
            print(f"{past:>6} {new:>4} {ours_ms:>9.3f} {theirs_ms:>10.3f} {ours_ms / theirs_ms:>6.2f} {difference:>11.2e}")


if __name__ == "__main__":
    main()
