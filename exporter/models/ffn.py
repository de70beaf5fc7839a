"""Feed-forward blocks: MiniCPM's gated SiLU MLP and BlockFFN's ReLU-routed experts (dense form)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.norm import RMSNorm


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BlockFFN(nn.Module):
    """r = RMSNorm_E(ReLU(x Wr^T)); u = SiLU(x Wu^T) viewed as E experts of width de, scaled by r; out = u Wd^T.

    This dense form is the reference: every expert is computed and idle ones are multiplied by
    an exact zero. The sparsity pass replaces it with a form that computes only active experts.
    """

    def __init__(self, hidden: int, num_experts: int, expert_size: int, eps: float):
        super().__init__()
        self.num_experts = num_experts
        self.expert_size = expert_size
        self.router_proj = nn.Linear(hidden, num_experts, bias=False)
        self.router_norm = RMSNorm(num_experts, eps)
        self.up_proj = nn.Linear(hidden, num_experts * expert_size, bias=False)
        self.down_proj = nn.Linear(num_experts * expert_size, hidden, bias=False)

    def router_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised expert scores [..., E]; zero exactly where an expert is idle."""
        return self.router_norm(F.relu(self.router_proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.router_scores(x)
        experts = F.silu(self.up_proj(x)).unflatten(-1, (self.num_experts, self.expert_size))
        return self.down_proj((experts * scores.unsqueeze(-1)).flatten(-2))


def build_ffn(config: ModelConfig) -> nn.Module:
    if config.ffn == "blockffn":
        return BlockFFN(config.hidden_size, config.num_experts, config.expert_size, config.rms_norm_eps)
    return GatedMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
