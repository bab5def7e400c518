"""Writes a transformers checkpoint folder as a GGUF file the way llama.cpp's converter
(``convert_hf_to_gguf.py``) does, for the tests of our GGUF converter.

Architecture names, metadata keys and tensor names are llama.cpp's (through the ``gguf``
package's own tables); the llama architecture's query and key rows are permuted as llama.cpp
permutes them; Llama 3.1's RoPE scaling becomes the ``rope_freqs.weight`` factors. Every tensor
is written as F32, so that a round trip is exact. The tokenizer is the default model's byte-level
BPE vocabulary, with the pre-tokenizer name the caller gives (``write_gguf``), or a SentencePiece
model's pieces, scores and types (``write_sentencepiece_gguf``).

Two things llama.cpp's converter would lose are kept, so that the file describes the same model:
the Llama 3 factors use the rope_scaling's ``original_max_position_embeddings`` (llama.cpp reads a
top-level key that Llama 3.x configs lack and falls back to 8192, their value), and Mistral's
sliding window is written under the GGUF key other architectures use for it
(``llama.attention.sliding_window``; llama.cpp drops it for the llama architecture).
"""

import json
import math
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import gguf
import numpy as np
import sentencepiece
from safetensors.numpy import load_file

# config.json's model_type -> the GGUF architecture llama.cpp writes it as.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
                 "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}


def permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of a query or key projection's rows (weight or bias) for its rotary layout."""
    rows = weights.shape[0]
    return weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp computes for a ``llama3`` rope_scaling: each frequency's divisor."""
    scaling = config["rope_scaling"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = config.get("rope_theta", 10000.0)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for frequency in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelength = 2 * math.pi / frequency
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_parameters(writer: gguf.GGUFWriter, config: dict, arch: gguf.MODEL_ARCH) -> None:
    writer.add_name(config.get("_name_or_path") or config["model_type"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if scaling.get(key) is not None:
                add(scaling[key])
    # llama3: the rope_freqs tensor; dynamic: llama.cpp writes nothing (it has no such scaling).
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config["vocab_size"])
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        writer.add_rope_dimension_count(head_dim)
    if config["model_type"] == "mistral" and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, config: dict, pre: str) -> None:
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    added = {token["id"]: token for token in tokenizer["added_tokens"]}
    tokens = [None] * config["vocab_size"]
    for text, index in vocab.items():
        tokens[index] = text
    # As llama.cpp's converter: added tokens are control tokens when special, user-defined otherwise.
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for index, token in added.items():
        tokens[index] = token["content"]
        types[index] = gguf.TokenType.CONTROL if token["special"] else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge)
                             for merge in tokenizer["model"]["merges"]])
    ids = {text: index for index, text in enumerate(tokens)}
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        # The tokenizer's own special tokens first, then the model config's ids, as llama.cpp's SpecialVocab.
        text = tokenizer_config.get(f"{kind}_token")
        index = ids.get(text["content"] if isinstance(text, dict) else text, config.get(f"{kind}_token_id"))
        if index is not None:
            add(index)
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])


def _tensors(checkpoint: Path, config: dict, arch: gguf.MODEL_ARCH) -> Dict[str, np.ndarray]:
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tensors = {}
    for name, array in sorted(load_file(str(checkpoint / "model.safetensors")).items()):
        array = array.astype(np.float32)
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = permute(array, config["num_attention_heads"])
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = permute(array, config["num_key_value_heads"])
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name}")
        tensors[gguf_name] = array
    return tensors


def write_sentencepiece_tokenizer(writer: gguf.GGUFWriter, model_file: Path, vocab_size: int, add_bos: bool = True,
                                  add_space_prefix: Optional[bool] = None,
                                  token_types: Optional[Mapping[int, int]] = None,
                                  order: Optional[Sequence[int]] = None) -> None:
    """The SentencePiece model ``model_file`` as llama.cpp's converter writes it (``_set_vocab_sentencepiece``):
    each piece with its score and type, padded to ``vocab_size`` with unused pieces; the model's BOS, EOS
    and unknown ids. ``add_space_prefix`` is written only when given (llama.cpp writes it for a few models
    only); ``token_types`` overrides the types of some ids, for files the converter must refuse; ``order``
    lists the model's ids in the order the file gives them (by default, the model's)."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for index in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(index))
        scores.append(processor.get_score(index))
        kind = gguf.TokenType.NORMAL
        for test, marked in ((processor.is_unknown, gguf.TokenType.UNKNOWN),
                             (processor.is_control, gguf.TokenType.CONTROL),
                             (processor.is_unused, gguf.TokenType.UNUSED), (processor.is_byte, gguf.TokenType.BYTE)):
            if test(index):
                kind = marked
                break
        types.append((token_types or {}).get(index, kind))
    order = list(order if order is not None else range(len(tokens)))
    tokens, scores, types = ([values[index] for index in order] for values in (tokens, scores, types))
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(order.index(processor.bos_id()))
    writer.add_eos_token_id(order.index(processor.eos_id()))
    writer.add_unk_token_id(order.index(processor.unk_id()))
    writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)


def _write_file(checkpoint: Path, out: Path, write_tokenizer: Callable[[gguf.GGUFWriter, dict], None],
                architecture: Optional[str] = None, rope_freqs: Optional[np.ndarray] = None) -> Path:
    config = json.loads((checkpoint / "config.json").read_text())
    arch = ARCHITECTURES[config["model_type"]]
    writer = gguf.GGUFWriter(str(out), architecture or gguf.MODEL_ARCH_NAMES[arch])
    _write_parameters(writer, config, arch)
    write_tokenizer(writer, config)
    for name, array in _tensors(checkpoint, config, arch).items():
        writer.add_tensor(name, array)
    scaling = config.get("rope_scaling") or {}
    if rope_freqs is None and scaling.get("rope_type") == "llama3":
        rope_freqs = llama3_rope_factors(config)
    if rope_freqs is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_gguf(checkpoint: Path, tokenizer_dir: Path, out: Path, pre: str, architecture: Optional[str] = None,
               rope_freqs: Optional[np.ndarray] = None) -> Path:
    """Writes the checkpoint folder ``checkpoint`` (config.json, model.safetensors) with the tokenizer of
    ``tokenizer_dir`` and the pre-tokenizer name ``pre`` as the GGUF file ``out``.

    ``architecture`` overrides the GGUF architecture name and ``rope_freqs`` the Llama 3 factors,
    for files the converter must refuse."""
    return _write_file(checkpoint, out, lambda writer, config: _write_tokenizer(writer, tokenizer_dir, config, pre),
                       architecture, rope_freqs)


def write_sentencepiece_gguf(checkpoint: Path, model_file: Path, out: Path, **options) -> Path:
    """Writes the checkpoint folder ``checkpoint`` with the SentencePiece model ``model_file`` as its tokenizer
    as the GGUF file ``out``; ``options`` go to ``write_sentencepiece_tokenizer``."""
    return _write_file(checkpoint, out, lambda writer, config: write_sentencepiece_tokenizer(
        writer, model_file, config["vocab_size"], **options))
