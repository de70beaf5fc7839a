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

from cpm_mobile.exporter.kernels import ops
from cpm_mobile.exporter.models.ffn import BlockFFN


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


class QuantisedFusedSparseBlockFFN(nn.Module):
    """FusedSparseBlockFFN over int8 or int4 codes of the experts' weights (ops.sparse_expert_ffn_int8/_int4).

    Built by exporter/quant/sparse_executorch.py from a FusedSparseBlockFFN and the torchao
    quantisation of its dense weights; `router_proj` is the quantised router the caller gives
    (an XNNPACK linear in the .pte). The buffers are the codes and scales the .pte stores; run
    eagerly, the op computes with exactly their dequantised values and fp32 activations.
    """

    def __init__(self, fused: FusedSparseBlockFFN, router_proj: nn.Module, bits: int, up: torch.Tensor,
                 up_scales: torch.Tensor, down: torch.Tensor, down_scales: torch.Tensor):
        super().__init__()
        self.num_experts = fused.num_experts
        self.expert_size = fused.expert_size
        self.hidden_size = fused.hidden_size
        self.bits = bits
        self.router_proj = router_proj
        self.router_norm = fused.router_norm
        self.register_buffer("up_codes", up)
        self.register_buffer("up_scales", up_scales)
        self.register_buffer("down_codes", down)
        self.register_buffer("down_scales", down_scales)

    def router_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.router_norm(F.relu(self.router_proj(x)))

    def dequantised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 up rows and down rows [E*de, H] the codes stand for."""
        return ops.dequantised_rows(self.bits, self.up_codes, self.up_scales, self.down_codes, self.down_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.hidden_size)
        out = ops.sparse_expert_ffn_quantised(self.bits, tokens, self.router_scores(tokens), self.up_codes,
                                              self.up_scales, self.down_codes, self.down_scales)
        return out.reshape(shape)
