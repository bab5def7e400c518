"""Rotary position embeddings and the scalings current checkpoints declare.

A config's ``rope_scaling`` (or none) selects how the rotation frequencies are derived from
``rope_theta``: ``linear`` and ``dynamic`` stretch positions for a longer context, ``llama3``
(Llama 3.1 and later) slows only the low frequencies, ``yarn`` blends stretched and original
frequencies and scales the attention. ``RotaryEmbedding.tables`` gives the cos and sin of the
positions a step covers; ``dynamic`` depends on the sequence's length so far, the others not.
"""

import math
from typing import Any, Mapping, Optional, Tuple

import torch

# The keys each scaling reads from ``rope_scaling``, besides its type.
SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}


class UnsupportedRope(ValueError):
    """A ``rope_scaling`` this server cannot apply exactly."""


def scaling_type(rope_scaling: Optional[Mapping[str, Any]]) -> str:
    """The scaling's name (``rope_type``, or the older ``type``), ``default`` for none."""
    if not rope_scaling:
        return "default"
    if not isinstance(rope_scaling, Mapping):
        raise UnsupportedRope(f"rope_scaling must be a mapping, not {rope_scaling!r}")
    return str(rope_scaling.get("rope_type") or rope_scaling.get("type") or "default")


def validate_scaling(rope_scaling: Optional[Mapping[str, Any]]) -> None:
    """Raises ``UnsupportedRope`` for a scaling of an unknown type or without its parameters."""
    kind = scaling_type(rope_scaling)
    if kind not in SCALING_KEYS:
        raise UnsupportedRope(f"RoPE scaling {kind!r} is not supported (supported: {', '.join(SCALING_KEYS)})")
    missing = [key for key in SCALING_KEYS[kind] if rope_scaling.get(key) is None]
    if missing:
        raise UnsupportedRope(f"RoPE scaling {kind!r} needs {', '.join(missing)}")
    factor = rope_scaling.get("factor") if rope_scaling else None
    if factor is not None and (not isinstance(factor, (int, float)) or factor < 1):
        raise UnsupportedRope(f"RoPE scaling factor must be a number >= 1, not {factor!r}")


def _base_frequencies(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by the factor, short ones kept, the middle blended.
    slowed = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    in_middle = ~(wavelength < old_context / high) & ~(wavelength > old_context / low)
    return torch.where(in_middle, blended, slowed)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(base: float, dim: int, max_positions: int, scaling: Mapping[str, Any]) -> Tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or max_positions
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension_of(rotations: float) -> float:
        # The rotary dimension that turns ``rotations`` times over the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    positions = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    kept = 1 - ramp  # how much of each original frequency is kept (the rest is stretched by the factor)
    return (1.0 / (factor * positions)) * (1 - kept) + (1.0 / positions) * kept, float(attention_factor)


class RotaryEmbedding:
    """The rotation tables of one attention layer, for a config's head size, theta and scaling."""

    def __init__(self, config: Any, head_dim: int):
        self.dim = head_dim
        self.base = float(config.rope_theta)
        self.max_positions = int(config.max_position_embeddings)
        self.scaling = dict(config.rope_scaling or {})
        self.kind = scaling_type(self.scaling)
        validate_scaling(self.scaling)
        self.inv_freq, self.attention_factor = self._frequencies(self.max_positions)

    def _frequencies(self, length: int) -> Tuple[torch.Tensor, float]:
        kind, scaling = self.kind, self.scaling
        if kind == "yarn":
            return _yarn(self.base, self.dim, self.max_positions, scaling)
        if kind == "dynamic" and length > self.max_positions:
            factor = scaling["factor"]
            base = self.base * ((factor * length / self.max_positions) - (factor - 1)) ** (self.dim / (self.dim - 2))
            return _base_frequencies(base, self.dim), 1.0
        inv_freq = _base_frequencies(self.base, self.dim)
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, scaling)
        return inv_freq, 1.0

    def tables(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, shaped (length, head_dim), of positions ``start`` to ``start + length``."""
        inv_freq, attention_factor = self.inv_freq, self.attention_factor
        if self.kind == "dynamic" and start + length > self.max_positions:
            # As long contexts are seen: frequencies for the sequence's length so far.
            inv_freq, attention_factor = self._frequencies(start + length)
        positions = torch.arange(start, start + length, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq.to(device))
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Applies the rotation to ``states`` shaped (batch, heads, length, head_dim)."""
    half = states.shape[-1] // 2
    rotated_half = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated_half * sin
