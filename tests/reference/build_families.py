"""Builds a tiny random checkpoint of each model family with a current transformers release,
and records what that release computes for it: the reference our swarm must reproduce.

Run it with the reference release first on the path (``make`` installs it in ``.reference/``):

    PYTHONPATH=.reference/transformers-4.57.6 .venv/bin/python tests/reference/build_families.py OUT TOKENIZER_DIR

For every family, ``OUT/<name>/`` gets the checkpoint (``config.json``, ``model.safetensors``)
and ``reference.safetensors``: the prompts (in its metadata), their token ids of a short and a long prompt (longer than the
RoPE scaling's original context and than Mistral's window), the logits of every position of
each, and each prompt's 32-token greedy continuation, decoded step by step with the cache, as
``generate`` does. The prompts are tokenized with ``TOKENIZER_DIR``'s tokenizer, whose
vocabulary the models share. Weights are drawn with a fixed seed and larger than the usual
initialization (biases and norms included), so that a wrong detail moves the logits well past
the checks' tolerance.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

SEED = 2024
GREEDY_TOKENS = 32
# Shared by every family: small, with grouped-query attention.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
SHORT_PROMPT = "The capital of France is"
LONG_PROMPT = (
    "A swarm splits a large language model into blocks, and volunteers around the world each run a few "
    "of them. A client sends its hidden states from one server to the next, and every server keeps the "
    "attention caches of the blocks it runs, so that each new token costs one trip through the swarm. "
    "This text is long enough to pass the original context of the scaled rotary embeddings."
)

# name: (config class, model class, options). The first four are served by a two-node swarm in the
# tests; the Llama RoPE variants are checked block by block in-process.
FAMILIES = {
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(
        num_hidden_layers=4, rope_theta=500000.0, max_position_embeddings=1024, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "mistral": (MistralConfig, MistralForCausalLM, dict(
        num_hidden_layers=4, head_dim=32, sliding_window=24, max_position_embeddings=1024)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(
        num_hidden_layers=4, max_position_embeddings=1024, tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 32})),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(
        num_hidden_layers=4, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=False)),
    "llama-linear": (LlamaConfig, LlamaForCausalLM, dict(
        num_hidden_layers=2, max_position_embeddings=1024, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-dynamic": (LlamaConfig, LlamaForCausalLM, dict(
        num_hidden_layers=2, max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama2": (LlamaConfig, LlamaForCausalLM, dict(
        num_hidden_layers=2, max_position_embeddings=1024, attention_bias=True, mlp_bias=True)),
}


def _randomize(model: torch.nn.Module) -> None:
    """Weights far from the usual small initialization: norms around 1, biases and matrices N(0, 0.1)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn_like(parameter)
            parameter.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    output = model(ids, use_cache=True)
    chosen = []
    for _ in range(GREEDY_TOKENS):
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        chosen.append(token)
        output = model(token, past_key_values=output.past_key_values, use_cache=True)
    return torch.cat(chosen, dim=1)[0]


def build(name: str, out: Path, tokenizer) -> None:
    config_class, model_class, options = FAMILIES[name]
    torch.manual_seed(SEED)
    config = config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **SHAPE, **options)
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    _randomize(model)
    model.tie_weights()
    folder = out / name
    model.save_pretrained(folder, safe_serialization=True)
    record = {}
    with torch.no_grad():
        for prompt_name, text in (("short", SHORT_PROMPT), ("long", LONG_PROMPT)):
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            record[f"{prompt_name}_ids"] = ids[0]
            record[f"{prompt_name}_logits"] = model(ids).logits[0].contiguous()
            record[f"{prompt_name}_greedy"] = _greedy(model, ids)
    save_file(record, str(folder / "reference.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                        "short_prompt": SHORT_PROMPT, "long_prompt": LONG_PROMPT})
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, long prompt "
          f"{record['long_ids'].numel()} tokens", flush=True)


def main(out: Path, tokenizer_dir: Path) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for name in FAMILIES:
        build(name, out, tokenizer)
    (out / "versions.json").write_text(json.dumps({"transformers": transformers.__version__}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
