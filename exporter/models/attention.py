"""Attention projections (GQA and MLA). The cache and the attention product live in kv_cache.py.

Each attention module turns hidden states into rotated q, k, v of layout [B, T, heads, dim],
hands them to the layer's `attend` (which owns the KV cache and the softmax), and projects the
result back. Keeping `attend` outside lets each target swap in its own cache form (mutable
buffers, Core ML states, explicit ONNX past/present, ExecuTorch custom ops) with the same math.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cpm_mobile.exporter.models.config import MLA_LATENT_NORM_EPS, ModelConfig
from cpm_mobile.exporter.models.norm import RMSNorm
from cpm_mobile.exporter.models.rope import apply_rope

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias  # MiniCPM: none; Llama: attention_bias
        # Qwen3.5: q_proj also yields a sigmoid gate per head for the attention output.
        self.gated = config.attention_output_gate
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * (2 if self.gated else 1), bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if config.qk_norm:  # per-head norms of q and k before rotary (Qwen3.5)
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x)
        if self.gated:
            q, gate = q.view(batch, seq, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = q.reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        y = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v).reshape(batch, seq, -1)
        if self.gated:
            y = y * torch.sigmoid(gate.reshape(batch, seq, -1))
        return self.o_proj(y)


class MultiHeadLatentAttention(nn.Module):
    """MiniCPM3 / BlockFFN MLA: low-rank q and kv, a shared rotary key, rotate-half RoPE.

    The cache holds the expanded per-head keys and values (simple and exact; the compressed
    latent cache is a memory optimisation for later).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, MLA_LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, MLA_LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=False)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.queries(x).view(batch, seq, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(batch, seq, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rot = apply_rope(k_rot.view(batch, seq, 1, self.rope_dim), cos, sin)
        q = torch.cat((q_nope, apply_rope(q_rot, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(batch, seq, self.num_heads, self.rope_dim)), dim=-1)
        y = attend(q, k, v)
        return self.o_proj(y.reshape(batch, seq, -1))


def build_attention(config: ModelConfig) -> nn.Module:
    return MultiHeadLatentAttention(config) if config.attention == "mla" else GroupedQueryAttention(config)
