"""Convert a llama-architecture GGUF file into a transformers model folder.

The result (config.json, generation_config.json, model.safetensors in float32 and the
tokenizer files) loads with ``LlamaForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``, which is what a Petals server and client need.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

# llama.cpp's token type for control tokens (gguf.TokenType.CONTROL).
_CONTROL_TOKEN_TYPE = 3

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Pre-tokenizers named by llama.cpp's `tokenizer.ggml.pre` that are plain compositions of
# `tokenizers` components; others use regexes that would need checking one by one.
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q or k projection weight.

    llama.cpp's converter reorders each head's rows from the "halves" rotary layout that
    transformers uses to interleaved pairs; this restores the transformers order.
    ``n_heads`` is the number of attention heads for q and of key/value heads for k.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _f32(value: float) -> float:
    # GGUF stores floats as float32; go through numpy's shortest float32 repr so that
    # 1e-5 is written as 1e-05 rather than 9.999999747378752e-06.
    return float(str(np.float32(value)))


def _build_config(meta: dict[str, Any], has_output: bool, n_tokens: int) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' can be converted")
    if meta.get("llama.expert_count", 0):
        raise ValueError("mixture-of-experts GGUF models are not supported")
    hidden = meta["llama.embedding_length"]
    heads = meta["llama.attention.head_count"]
    rope_dim = meta.get("llama.rope.dimension_count", hidden // heads)
    if rope_dim != hidden // heads:
        # LlamaConfig (transformers 4.34) derives the head size as hidden // heads.
        raise ValueError(f"rope dimension {rope_dim} differs from head size {hidden // heads}")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"type": "linear", "factor": _f32(meta["llama.rope.scaling.factor"])}
    elif scaling == "none":
        rope_scaling = None
    else:
        raise ValueError(f"unsupported rope scaling {scaling!r}")
    return LlamaConfig(
        vocab_size=meta.get("llama.vocab_size", n_tokens),
        hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        max_position_embeddings=meta["llama.context_length"],
        rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=_f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        tie_word_embeddings=not has_output,
        torch_dtype="float32",
    )


def _hf_tensor_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_TENSOR_NAME.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"unexpected tensor {name!r} in a llama GGUF file")
    return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"


def _convert_tensors(reader: gguf.GGUFReader, config: LlamaConfig) -> dict[str, np.ndarray]:
    tensors = {}
    for tensor in reader.tensors:
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        weight = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        weight = weight.reshape(shape)
        if tensor.name.endswith(".attn_q.weight"):
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif tensor.name.endswith(".attn_k.weight"):
            weight = unpermute_qk(weight, config.num_key_value_heads)
        # Tensors read from the file are read-only views of a memory map; safetensors
        # wants owned, contiguous arrays.
        tensors[_hf_tensor_name(tensor.name)] = np.ascontiguousarray(weight)
    return tensors


def _build_tokenizer(meta: dict[str, Any], model_max_length: int) -> PreTrainedTokenizerFast:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: only 'gpt2' (byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: known are {sorted(_PRE_TOKENIZERS)}")

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={text: i for i, text in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens must never be split by BPE; registering them as special added tokens
    # keeps each one a single id and lets decode(skip_special_tokens=True) drop them.
    types = meta["tokenizer.ggml.token_type"]
    tokenizer.add_special_tokens(
        [
            AddedToken(text, special=True, normalized=False)
            for text, token_type in zip(tokens, types)
            if token_type == _CONTROL_TOKEN_TYPE
        ]
    )

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[token_id]

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])],
        )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        model_max_length=model_max_length,
        # Llama's forward() takes no token_type_ids; without this the tokenizer returns them
        # and generate(**tokenizer(text)) fails.
        model_input_names=["input_ids", "attention_mask"],
        # The default (True) rewrites " ," to "," and so on, breaking decode(encode(s)) == s.
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = meta.get("tokenizer.chat_template")
    return wrapped


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert the llama GGUF file ``gguf_path`` into a transformers model folder ``out_dir``.

    Every tensor is dequantized to float32. The folder is assembled under a temporary
    name next to ``out_dir`` and renamed at the end, so ``out_dir`` only ever exists
    complete. Raises FileExistsError if ``out_dir`` exists and ValueError for an
    architecture, tensor or tokenizer this converter does not handle. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _read_metadata(reader)
    has_output = any(tensor.name == "output.weight" for tensor in reader.tensors)
    config = _build_config(meta, has_output, len(meta.get("tokenizer.ggml.tokens", ())))
    tokenizer = _build_tokenizer(meta, config.max_position_embeddings)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory, so the final rename stays on one file system; mkdir (unlike
    # mkdtemp's 0700) gives the folder the usual permissions for the umask.
    tmp_dir = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.partial"
    tmp_dir.mkdir()
    try:
        config.save_pretrained(tmp_dir)
        weights = tmp_dir / "model.safetensors"
        save_file(_convert_tensors(reader, config), weights, metadata={"format": "pt"})
        # safetensors always creates its file 0600; make it as readable as config.json.
        shutil.copymode(tmp_dir / "config.json", weights)
        # Carries bos/eos/pad over from the config, so generate() stops at EOS.
        GenerationConfig.from_model_config(config).save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
