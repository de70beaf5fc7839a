"""FusedSparseBlockFFN: BlockFFN whose experts run in one custom op, cpm_mobile::sparse_expert_ffn.

The router (a small linear, ReLU, RMSNorm over E) stays ordinary ops, so XNNPACK takes it; the
op then reads only the active experts' up rows and down rows, in place, on ExecuTorch's threadpool
(sparse_expert_ffn.cpp). Same numbers as the dense BlockFFN up to the down projection's summation
order (idle experts contribute exact zeros there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exporter.kernels import ops
from exporter.models.ffn import BlockFFN


class FusedSparseBlockFFN(nn.Module):
    """Shares the router and the up projection's weight with the dense module it is built from."""

    def __init__(self, dense: BlockFFN):
        super().__init__()
        self.num_experts = dense.num_experts
        self.expert_size = dense.expert_size
        self.hidden_size = dense.router_proj.in_features
        self.router_proj = dense.router_proj
        self.router_norm = dense.router_norm
        self.up_weight = dense.up_proj.weight  # [E*de, H], one row per expert unit already
        # [H, E*de] -> [E*de, H]: each unit's down column becomes a contiguous row (a copy, made once).
        self.down_rows = nn.Parameter(dense.down_proj.weight.detach().t().contiguous(), requires_grad=False)

    def router_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.router_norm(F.relu(self.router_proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.hidden_size)
        out = ops.sparse_expert_ffn(tokens, self.router_scores(tokens), self.up_weight, self.down_rows)
        return out.reshape(shape)
