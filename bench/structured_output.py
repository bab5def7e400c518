"""Speed of JSON-schema-constrained decoding against free decoding on the default model.

Both run the server's own ``TokenStream`` through an embedded swarm node on this machine, the
same number of tokens from the same chat prompt, alternating: free greedy decoding, and greedy
decoding constrained to a schema whose output is long (an object holding a string of at least
2,000 characters), so that neither run stops early. Prints tokens/s for each and their ratio
(the target is at least 0.9x), and the constraint's own time per token.

    .venv/bin/python bench/structured_output.py [--tokens 64] [--repeats 3]
"""

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import default_model_on_a_local_swarm  # noqa: E402
from bench.swarm_vs_local import greedy_swarm  # noqa: E402
from sessions.requests import SamplingParams  # noqa: E402

QUESTION = "Write a long story about a lighthouse keeper, as JSON with the story in the field \"story\"."
LONG_OUTPUT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["story"],
                      "properties": {"story": {"type": "string", "minLength": 2000}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    free, constrained = [], []
    with default_model_on_a_local_swarm(QUESTION) as swarm:
        spec, tokenizer, loaded, prompt_ids = swarm.spec, swarm.tokenizer, swarm.loaded, swarm.prompt_ids
        # Warm-up, the constraint library's view of the vocabulary included (built once per model).
        greedy_swarm(loaded, prompt_ids, 4, SamplingParams())
        greedy_swarm(loaded, prompt_ids, 4, SamplingParams(json_schema=json.dumps(LONG_OUTPUT_SCHEMA)))
        for _ in range(args.repeats):  # alternating, so that load on the machine hits both alike
            free.append(greedy_swarm(loaded, prompt_ids, args.tokens, SamplingParams())[1])
            ids, seconds = greedy_swarm(
                loaded, prompt_ids, args.tokens, SamplingParams(json_schema=json.dumps(LONG_OUTPUT_SCHEMA)))
            constrained.append(seconds)
    free_rate = args.tokens / statistics.median(free)
    constrained_rate = args.tokens / statistics.median(constrained)
    print(f"model: {spec.key}, {args.tokens} greedy tokens, median of {args.repeats} alternating runs each")
    print(f"free decoding        : {free_rate:6.2f} tokens/s")
    print(f"constrained (schema) : {constrained_rate:6.2f} tokens/s")
    print(f"ratio                : {constrained_rate / free_rate:6.2f}x   (target: at least 0.90x)")
    cost_ms = 1000 * (statistics.median(constrained) - statistics.median(free)) / args.tokens
    print(f"constraint's cost    : {cost_ms:6.2f} ms per token")
    print(f"constrained output starts: {tokenizer.decode(ids)[:80]!r}")


if __name__ == "__main__":
    main()
