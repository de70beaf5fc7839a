"""The static KV cache of the reference module and the attention product over it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, Hkv, S, D]; mask: bool [T, S] (True = may attend). Returns [B, T, H, Dv]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return y.transpose(1, 2)


def causal_mask(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
    """bool [T, S]: the token at positions[t] sees cache slots 0..positions[t]."""
    slots = torch.arange(cache_len, dtype=positions.dtype, device=positions.device)
    return slots[None, :] <= positions[:, None]


class StaticKVCache(nn.Module):
    """Keys and values of one layer for `max_seq_len` positions, held as buffers and updated in place.

    Layout [1, heads, max_seq_len, dim]; the new tokens' rows are written with index_copy_ at
    their absolute positions, then attention runs over the whole cache under the causal mask.
    """

    def __init__(self, heads: int, k_dim: int, v_dim: int, max_seq_len: int, scale: float, dtype: torch.dtype):
        super().__init__()
        self.scale = scale
        self.register_buffer("k_cache", torch.zeros(1, heads, max_seq_len, k_dim, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, heads, max_seq_len, v_dim, dtype=dtype), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        self.k_cache.index_copy_(2, positions, k.transpose(1, 2).to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, positions, v.transpose(1, 2).to(self.v_cache.dtype))
        # A cache stored narrower than the compute (Core ML states are fp16) is widened to read it.
        k_all, v_all = self.k_cache.to(q.dtype), self.v_cache.to(q.dtype)
        return grouped_sdpa(q.transpose(1, 2), k_all, v_all, mask, self.scale)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
