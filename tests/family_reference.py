"""The reference checkpoints of the model families (``tests/reference/build_families.py``) and
our own computation of them, block by block, for the checks that compare the two."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATOR = REPO_ROOT / "tests" / "reference" / "build_families.py"
REFERENCE_TRANSFORMERS = REPO_ROOT / ".reference" / "transformers-4.57.6"
# Families served by a two-node swarm in the tests; the other checkpoints are RoPE variants.
SWARM_FAMILIES = ("llama3", "mistral", "qwen2", "qwen3")
LOGITS_TOLERANCE = 1e-4


def build_reference(cache_dir: Path, tokenizer_dir: Path) -> Path:
    """The reference checkpoints under ``cache_dir``, built by the generator with the reference
    transformers release unless the current generator's output is already there."""
    digest = hashlib.sha256(GENERATOR.read_bytes()).hexdigest()[:16]
    out = cache_dir / f"reference-families-{digest}"
    if (out / "versions.json").exists():
        return out
    if not REFERENCE_TRANSFORMERS.is_dir():
        raise RuntimeError(f"the reference transformers is not installed in {REFERENCE_TRANSFORMERS} (run make test)")
    environment = dict(os.environ, PYTHONPATH=str(REFERENCE_TRANSFORMERS))
    subprocess.run([sys.executable, str(GENERATOR), str(out), str(tokenizer_dir)], check=True, env=environment,
                   capture_output=True, text=True)
    return out


def load_reference(folder: Path) -> Dict[str, torch.Tensor]:
    """What the reference computed for the checkpoint in ``folder``."""
    return load_file(str(folder / "reference.safetensors"))


def reference_prompt(folder: Path, prompt: str) -> str:
    """The text of the reference's ``prompt`` ("short" or "long")."""
    with safe_open(str(folder / "reference.safetensors"), framework="pt") as reference:
        return reference.metadata()[f"{prompt}_prompt"]


def our_logits(folder: Path, ids: Sequence[int], chunks: Sequence[int]) -> torch.Tensor:
    """The logits of every position of ``ids`` computed here with our blocks, fed ``chunks`` tokens
    at a time through petals' cache layout (the way a swarm server runs them)."""
    import swarm.petals_api  # noqa: F401  (registers the families)
    from petals.utils.auto_config import AutoDistributedConfig

    config = AutoDistributedConfig.from_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    blocks: List[torch.nn.Module] = []
    for index in range(config.num_hidden_layers):
        block = config.block_class(config)
        prefix = f"model.layers.{index}."
        block.load_state_dict({name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)})
        blocks.append(block.eval())
    embeddings = weights["model.embed_tokens.weight"]
    head = weights.get("lm_head.weight", embeddings)
    norm_weight, eps = weights["model.norm.weight"], config.rms_norm_eps
    caches = [None] * len(blocks)
    outputs, start = [], 0
    with torch.inference_mode():
        for size in chunks:
            hidden = embeddings[torch.tensor([list(ids[start:start + size])])]
            for index, block in enumerate(blocks):
                hidden, caches[index] = block(hidden, layer_past=caches[index], use_cache=True)
            variance = hidden.pow(2).mean(-1, keepdim=True)
            outputs.append((norm_weight * hidden * torch.rsqrt(variance + eps)) @ head.T)
            start += size
    return torch.cat(outputs, dim=1)[0]


CHAT_TEMPLATES = REPO_ROOT / "tests" / "chat_templates"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def serving_folder(reference_dir: Path, family: str, tokenizer_dir: Path, dest: Path) -> Path:
    """A servable folder of ``family``'s reference checkpoint: its weights, the tokenizer the
    reference used, and the family's chat template when the tests have one
    (``tests/chat_templates/<family>.jinja``)."""
    import json
    import shutil

    dest.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(reference_dir / family / name, dest / name)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, dest / name)
    template = CHAT_TEMPLATES / f"{family}.jinja"
    if template.exists():
        tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = template.read_text()
        (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return dest
