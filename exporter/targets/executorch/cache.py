"""The KV cache in the form ExecuTorch's LLM custom ops work on (llama::update_cache + llama::custom_sdpa).

A drop-in for `StaticKVCache` (same call, same numbers): buffers of layout [1, max_seq_len, heads, dim],
written in place by `update_cache` at the call's first position, and attention by `custom_sdpa`,
which is causal from that position, so slots beyond the newest token are never read.

custom_sdpa needs keys and values of one shape. MLA has wider keys (nope + rope) than values, so
its value rows are zero-padded to the key width and the padding is sliced off the output: the
attention weights are unchanged and the padded columns of the product are exactly zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers torch.ops.llama.*

from cpm_mobile.exporter.models.kv_cache import StaticKVCache


class CustomOpKVCache(nn.Module):
    def __init__(self, heads: int, k_dim: int, v_dim: int, max_seq_len: int, scale: float, dtype: torch.dtype):
        super().__init__()
        self.scale = scale
        self.v_dim = v_dim
        self.register_buffer("k_cache", torch.zeros(1, max_seq_len, heads, k_dim, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, max_seq_len, heads, k_dim, dtype=dtype), persistent=False)

    @classmethod
    def like(cls, cache: StaticKVCache) -> "CustomOpKVCache":
        """An empty custom-op cache with the same heads, widths, length, scale and dtype."""
        _, heads, max_seq_len, k_dim = cache.k_cache.shape
        return cls(heads, k_dim, cache.v_cache.shape[-1], max_seq_len, cache.scale, cache.k_cache.dtype)

    @property
    def value_padding(self) -> int:
        return self.k_cache.shape[-1] - self.v_dim

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        # positions are contiguous (input_pos + arange(T)), so the first one says everything;
        # the causal mask is implied by it and `mask` is not needed.
        start_pos = positions[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos < self.k_cache.shape[1])
        if self.value_padding:
            v = F.pad(v, (0, self.value_padding))
        torch.ops.llama.update_cache(k.to(self.k_cache.dtype), self.k_cache, start_pos)
        torch.ops.llama.update_cache(v.to(self.v_cache.dtype), self.v_cache, start_pos)
        y = torch.ops.llama.custom_sdpa(q.to(self.k_cache.dtype), self.k_cache, self.v_cache, start_pos,
                                        None, 0.0, True, self.scale)
        return y[..., : self.v_dim] if self.value_padding else y

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
