"""Rotary position tables: plain RoPE and MiniCPM's LongRoPE (factors apply at every length)."""
from __future__ import annotations

import math

import torch

from exporter.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, rotary_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies and the cos/sin magnitude scale (LongRoPE's mscale)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind != "longrope":
        return inv_freq, 1.0
    # MiniCPM builds its cos/sin cache once for max_position_embeddings, so the long factors
    # apply whenever the model was configured beyond the original context, whatever the prompt length.
    original = rope.original_max_position_embeddings
    factors = rope.long_factor if max_position_embeddings > original else rope.short_factor
    inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    if rope.attention_factor is not None:
        return inv_freq, float(rope.attention_factor)
    scale = max_position_embeddings / original
    mscale = 1.0 if scale <= 1.0 else math.sqrt(1.0 + math.log(scale) / math.log(original))
    return inv_freq, mscale


def rope_tables(
    rope: RopeConfig, rotary_dim: int, max_position_embeddings: int, table_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [table_len, rotary_dim] in float32 (rotate-half layout)."""
    inv_freq, mscale = inverse_frequencies(rope, rotary_dim, max_position_embeddings)
    positions = torch.arange(table_len, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * mscale, angles.sin() * mscale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D] for the tokens' positions."""
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin
