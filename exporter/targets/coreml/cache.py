"""The KV cache in the form Core ML runs: fp16 state buffers written with a slice update.

A drop-in for `StaticKVCache` (same call, same math): buffers of layout [1, heads, max_seq_len,
dim], but always fp16 (Core ML states must be fp16) and written with a slice update at the
call's first position instead of `index_copy_`, which coremltools cannot convert. It converts to
MIL `slice_update` on the state, so a decode step rewrites one row per layer rather than the
whole cache. It is spelled `copy_(slice_scatter(...))`: the equivalent view assignment
`cache[:, :, start:end] = new` makes torch.export specialise T != max_seq_len (a contiguity
guard on the view), which would forbid a prefill of the full cache length. Reads widen the cache
to the compute dtype, then attention runs over all slots under the causal mask, as in the
reference.
"""
from __future__ import annotations

import torch
from torch import nn

from cpm_mobile.exporter.models.kv_cache import StaticKVCache, grouped_sdpa

STATE_DTYPE = torch.float16


class CoreMLKVCache(nn.Module):
    def __init__(self, heads: int, k_dim: int, v_dim: int, max_seq_len: int, scale: float):
        super().__init__()
        self.scale = scale
        self.register_buffer("k_cache", torch.zeros(1, heads, max_seq_len, k_dim, dtype=STATE_DTYPE), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, heads, max_seq_len, v_dim, dtype=STATE_DTYPE), persistent=False)

    @classmethod
    def like(cls, cache: StaticKVCache) -> "CoreMLKVCache":
        """An empty Core ML cache with the same heads, widths, length and scale (fp16 whatever the source)."""
        _, heads, max_seq_len, k_dim = cache.k_cache.shape
        return cls(heads, k_dim, cache.v_cache.shape[-1], max_seq_len, cache.scale)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        # positions are contiguous (input_pos + arange(T)): the first one places the whole block.
        start = positions[0].item()
        end = start + k.shape[1]
        torch._check(start >= 0)
        torch._check(end <= self.k_cache.shape[2])
        self.k_cache.copy_(self.k_cache.slice_scatter(k.transpose(1, 2).to(STATE_DTYPE), 2, start, end))
        self.v_cache.copy_(self.v_cache.slice_scatter(v.transpose(1, 2).to(STATE_DTYPE), 2, start, end))
        k_all, v_all = self.k_cache.to(q.dtype), self.v_cache.to(q.dtype)
        return grouped_sdpa(q.transpose(1, 2), k_all, v_all, mask, self.scale)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
