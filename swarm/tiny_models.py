"""Small random models that the tests and the benchmarks build for themselves: a Llama and a BLOOM.

They borrow the default model's tokenizer, so their text paths (multi-byte characters,
special tokens) are real, and use a fixed seed, so every run builds the same weights. Small
enough that a swarm serving one shows the server's own costs, not the model's compute.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

SEED = 1234


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, tokenizer_dir: Path) -> Path:
    """A 4-block Llama with grouped-query attention, hidden size 64."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(LlamaForCausalLM(config), tokenizer, path)


def make_tiny_bloom(path: Path, tokenizer_dir: Path) -> Path:
    """A 3-block BLOOM, hidden size 64."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(SEED)
    config = BloomConfig(
        vocab_size=len(tokenizer), hidden_size=64, n_layer=3, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # BLOOM checkpoints store blocks as "h.N..." (no "transformer." prefix), as petals expects;
    # the language-model head is tied to the embeddings.
    return _save(BloomForCausalLM(config).transformer, tokenizer, path)
