"""The transformer block our nodes run for every Llama-style family (Llama 2 and 3.x, Mistral,
Qwen2 and 2.5, Qwen3): one implementation whose differences are read from the config.

What differs between the families is declared on their configs (``swarm.families.configs``):
biases on the q/k/v (and output) projections, an RMSNorm on each head's queries and keys,
a head size apart from ``hidden_size / heads``, a sliding attention window and the RoPE
scaling. The block speaks petals' server protocol: ``layer_past`` holds the keys as
(batch * kv_heads, head_dim, length) and the values as (batch * kv_heads, length, head_dim),
and the returned cache covers the whole sequence so far, in the same layout.
"""

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from swarm.families.rope import RotaryEmbedding, rotate


class RMSNorm(nn.Module):
    """Root-mean-square normalization, computed in float32 whatever the weights' dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.eps)).to(dtype)


class SelfAttention(nn.Module):
    """Causal grouped-query attention with rotary positions over a cache of the past keys and values."""

    def __init__(self, config: Any):
        super().__init__()
        self.num_heads = config.num_attention_heads  # petals counts these to size the attention caches
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.attention_window
        inner, kv_inner = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_inner, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_inner, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=config.output_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, self.head_dim)

    def _heads(self, states: torch.Tensor, count: int) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, count, self.head_dim)

    def _mask(self, length: int, past: int, device: torch.device) -> torch.Tensor:
        """Which keys each new query may see: its past and itself, within the window if any."""
        queries = torch.arange(past, past + length, device=device)[:, None]
        keys = torch.arange(past + length, device=device)[None, :]
        visible = keys <= queries
        if self.window is not None:
            visible &= keys > queries - self.window
        return visible

    def forward(self, hidden_states: torch.Tensor, past: Optional[Tuple[torch.Tensor, torch.Tensor]]):
        """Attends the new positions to ``past`` (keys and values shaped (batch, kv_heads, length,
        head_dim)); returns the output and the keys and values of the whole sequence."""
        batch, length, _ = hidden_states.shape
        past_length = past[0].shape[2] if past is not None else 0
        queries = self._heads(self.q_proj(hidden_states), self.num_heads)
        keys = self._heads(self.k_proj(hidden_states), self.num_key_value_heads)
        values = self._heads(self.v_proj(hidden_states), self.num_key_value_heads).transpose(1, 2)
        if hasattr(self, "q_norm"):
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        cos, sin = self.rotary.tables(past_length, length, hidden_states.device, hidden_states.dtype)
        queries, keys = rotate(queries.transpose(1, 2), cos, sin), rotate(keys.transpose(1, 2), cos, sin)
        if past is not None:
            keys, values = torch.cat((past[0], keys), dim=2), torch.cat((past[1], values), dim=2)
        mask = None
        if length > 1 or self.window is not None:  # a lone new token sees every position before it
            mask = self._mask(length, past_length, queries.device)
        output = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)
        output = output.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(output), (keys, values)


class GatedMLP(nn.Module):
    """The feed-forward part: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: Any):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class DecoderBlock(nn.Module):
    """One pre-norm transformer block (attention, then the gated MLP), in petals' block protocol.

    Its parameters are named as in the families' checkpoints (``self_attn.q_proj.weight``,
    ``mlp.gate_proj.weight``, ``input_layernorm.weight``, ...), so that petals loads a block's
    weights from a checkpoint unchanged.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.mlp = GatedMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, *args, layer_past=None, use_cache: bool = False, **kwargs):
        batch = hidden_states.shape[0]
        attention = self.self_attn
        past = None
        if layer_past is not None:
            past_keys, past_values = layer_past
            past_length = past_keys.shape[-1]
            shape = (batch, attention.num_key_value_heads, past_length, attention.head_dim)
            past = (past_keys.permute(0, 2, 1).reshape(shape), past_values.reshape(shape))
        attended, (keys, values) = attention(self.input_layernorm(hidden_states), past)
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        if not use_cache:
            return (hidden_states,)
        total = keys.shape[2]
        flat_keys = keys.reshape(-1, total, attention.head_dim).permute(0, 2, 1)
        return hidden_states, (flat_keys, values.reshape(-1, total, attention.head_dim))
