"""The tensors of a GGUF file as a transformers checkpoint holds them: names, row order, float32.

llama.cpp names tensors its own way (``blk.3.attn_q.weight``) and, for the llama architecture
only, reorders the rows of the query and key projections (weights and biases) for its rotary
layout; ``checkpoint_tensors`` maps both back.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Optional

import gguf
import numpy as np

# The file's tensor of Llama 3.1's RoPE frequency factors: config, not weights.
ROPE_FREQS = "rope_freqs.weight"

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q or k projection weight (or bias).

    llama.cpp's converter reorders each head's rows from the "halves" rotary layout that
    transformers uses to interleaved pairs; this restores the transformers order.
    ``n_heads`` is the number of attention heads for q and of key/value heads for k.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def layer_tensor_kind(name: str) -> Optional[str]:
    """A layer tensor's kind without its block and suffix (``attn_q.bias``), None for others."""
    match = _LAYER_TENSOR_NAME.fullmatch(name)
    return None if match is None else f"{match.group(2)}.{match.group(3)}"


def checkpoint_name(name: str) -> str:
    """The transformers checkpoint's name of the GGUF tensor ``name``; ValueError if there is none."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_TENSOR_NAME.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"unexpected tensor {name!r}: this converter cannot map it onto a model it serves")
    block, part, suffix = match.groups()
    return f"model.layers.{block}.{_LAYER_TENSORS[part]}.{suffix}"


def read_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor of the file dequantized to float32, in numpy's (transformers') dimension order;
    ValueError for a quantization the ``gguf`` package cannot undo."""
    shape = tuple(int(dim) for dim in reversed(tensor.shape))
    try:
        values = gguf.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"its tensor {tensor.name} is stored as {tensor.tensor_type.name}, "
                         "which cannot be dequantized here") from None
    return values.astype(np.float32, copy=False).reshape(shape)


def checkpoint_tensors(tensors: Iterable[gguf.ReaderTensor], qk_heads: Optional[tuple]) -> Dict[str, np.ndarray]:
    """The file's model tensors under their checkpoint names, as float32 arrays.

    ``qk_heads`` (query heads, key/value heads) undoes llama.cpp's row permutation of the query
    and key projections; None for architectures it does not permute. ``rope_freqs.weight`` is
    left out (it belongs to the config).
    """
    converted = {}
    for tensor in tensors:
        if tensor.name == ROPE_FREQS:
            continue
        array = read_tensor(tensor)
        kind = layer_tensor_kind(tensor.name)
        if qk_heads is not None and kind in ("attn_q.weight", "attn_q.bias"):
            array = unpermute_qk(array, qk_heads[0])
        elif qk_heads is not None and kind in ("attn_k.weight", "attn_k.bias"):
            array = unpermute_qk(array, qk_heads[1])
        # Tensors read from the file are read-only views of a memory map; safetensors
        # wants owned, contiguous arrays.
        converted[checkpoint_name(tensor.name)] = np.ascontiguousarray(array)
    return converted
