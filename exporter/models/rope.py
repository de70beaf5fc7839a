"""Rotary position tables: plain RoPE, transformers' rope_scaling types, and MiniCPM's LongRoPE.

The formulas follow transformers' modeling_rope_utils (the definition Llama checkpoints are
trained against) operation for operation in float32; they are written here rather than imported
because transformers is not a dependency of the export path, and because MiniCPM's LongRoPE picks
its factor list differently from transformers' (see RopeConfig.long_factor_rule). Tests compare
every type with transformers' LlamaForCausalLM.
"""
from __future__ import annotations

import math

import torch

from cpm_mobile.exporter.models.config import ModelConfig, RopeConfig


def _plain(theta: float, rotary_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (theta**exponents)


def inverse_frequencies(rope: RopeConfig, rotary_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies and the cos/sin magnitude scale (attention factor / mscale)."""
    if rope.kind == "linear":
        return _plain(rope.theta, rotary_dim) / rope.factor, 1.0
    if rope.kind == "llama3":
        return _llama3(rope, rotary_dim), 1.0
    if rope.kind == "yarn":
        return _yarn(rope, rotary_dim, max_position_embeddings)
    if rope.kind == "longrope":
        return _longrope(rope, rotary_dim, max_position_embeddings)
    # "dynamic" NTK equals plain RoPE up to max_position_embeddings, the longest cache we build
    # (transformers rescales only once a sequence grows past it; see exact_rope_limit).
    return _plain(rope.theta, rotary_dim), 1.0


def _llama3(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    inv_freq = _plain(rope.theta, rotary_dim)
    old_context = rope.original_max_position_embeddings
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _longrope(rope: RopeConfig, rotary_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings
    if rope.long_factor_rule == "context":
        # MiniCPM builds its cos/sin cache once for max_position_embeddings, so the long factors
        # apply whenever the model was configured beyond the original context, whatever the prompt length.
        factors = rope.long_factor if max_position_embeddings > original else rope.short_factor
        inv_freq = _plain(rope.theta, rotary_dim) / torch.tensor(factors, dtype=torch.float32)
    else:
        # transformers: short factors while the sequence fits the original context; exact_rope_limit
        # caps the cache there, so the short list is the one every position uses.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        inv_freq = 1.0 / (torch.tensor(rope.short_factor, dtype=torch.float32) * rope.theta**exponents)
    if rope.attention_factor is not None:
        return inv_freq, float(rope.attention_factor)
    scale = rope.factor if rope.factor is not None else max_position_embeddings / original
    mscale = 1.0 if scale <= 1.0 else math.sqrt(1.0 + math.log(scale) / math.log(original))
    return inv_freq, mscale


def exact_rope_limit(config: ModelConfig) -> tuple[int, str] | None:
    """Longest cache whose positions all rotate as transformers rotates them, with the reason, or None.

    transformers' "dynamic" NTK and its LongRoPE recompute frequencies from the current sequence
    length (past max_position_embeddings, resp. the original context): keys already cached were
    rotated with the old frequencies, so no static table reproduces a sequence crossing that point.
    """
    rope = config.rope
    if rope.kind == "longrope" and rope.long_factor_rule == "length":
        limit = rope.original_max_position_embeddings
        return limit, f"longrope switches to its long factors past original_max_position_embeddings={limit}"
    if rope.kind == "dynamic":
        limit = config.max_position_embeddings
        return limit, f"dynamic NTK rope rescales its frequencies past max_position_embeddings={limit}"
    return None


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
    """x: [B, T, H, D]; cos/sin: [T, R] for the tokens' positions. R < D (partial rotary): the first R
    dims rotate and the rest pass through."""
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        x_rot, x_pass = x[..., :rotary], x[..., rotary:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
    return x * cos + rotate_half(x) * sin
