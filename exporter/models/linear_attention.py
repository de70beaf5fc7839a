"""Gated DeltaNet, the linear-attention layer of Qwen3.5 hybrid backbones, and the state it carries.

The layer projects hidden states to q, k, v (one fused projection), a gate z, an update rate b and a
decay a; q, k, v pass a causal depthwise conv (kernel K) and SiLU; q and k are L2-normalised; the
gated delta rule (exporter/kernels/ops.py) mixes tokens through a recurrent state of
[value heads, key dim, value dim]; a gated RMSNorm and out_proj close it.

Like the attention modules it hands the stateful parts to a per-layer object (`Recurrence`) that
each target supplies in its own form: buffers updated in place for the reference module and the
.pte, explicit past/present tensors for the .onnx. A call at position 0 starts a new sequence, as a
KV cache written from slot 0 does: the reference form zeroes its state there.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cpm_mobile.exporter.kernels import ops
from cpm_mobile.exporter.models.config import LinearAttentionConfig, ModelConfig

L2_NORM_EPS = 1e-6  # transformers' l2norm (and the FLA kernels') default


class Recurrence(Protocol):
    """A linear-attention layer's state for one call."""

    def convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [1, T, C] -> causal depthwise conv over the state's last K-1 inputs and x (no activation)."""

    def recur(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              scale: float) -> torch.Tensor:
        """The gated delta rule (ops.gated_delta_rule) from the state: out [1, T, H, Dv]."""


def causal_conv(past: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """past [1, C, K-1] (the inputs before x), x [1, T, C] -> (conv output [1, T, C], the new past)."""
    window = torch.cat((past.to(x.dtype), x.transpose(1, 2)), dim=2)
    out = F.conv1d(window, weight.to(x.dtype), groups=weight.shape[0])
    return out.transpose(1, 2), window[:, :, -past.shape[2]:]


def l2norm(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt((x32 * x32).sum(-1, keepdim=True) + L2_NORM_EPS)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """weight * RMSNorm(x) * SiLU(z), per value head (transformers' Qwen3_5RMSNormGated)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(dtype) * F.silu(z.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        spec = config.linear_attention
        assert spec is not None
        self.spec = spec
        hidden = config.hidden_size
        self.in_proj_qkv = nn.Linear(hidden, spec.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, spec.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, spec.num_value_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, spec.num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(spec.conv_dim, spec.conv_dim, spec.conv_kernel, groups=spec.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(spec.num_value_heads))
        self.A_log = nn.Parameter(torch.zeros(spec.num_value_heads))
        self.norm = GatedRMSNorm(spec.value_head_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(spec.value_dim, hidden, bias=False)
        self.scale = spec.key_head_dim**-0.5

    def forward(self, x: torch.Tensor, state: Recurrence) -> torch.Tensor:
        spec = self.spec
        batch, seq, _ = x.shape
        mixed = F.silu(state.convolve(self.in_proj_qkv(x), self.conv1d.weight))
        q, k, v = mixed.split([spec.key_dim, spec.key_dim, spec.value_dim], dim=-1)
        q = l2norm(q.reshape(batch, seq, spec.num_key_heads, spec.key_head_dim))
        k = l2norm(k.reshape(batch, seq, spec.num_key_heads, spec.key_head_dim))
        v = v.reshape(batch, seq, spec.num_value_heads, spec.value_head_dim)
        groups = spec.num_value_heads // spec.num_key_heads
        if groups > 1:  # each key head serves `groups` consecutive value heads
            q = q.repeat_interleave(groups, dim=2)
            k = k.repeat_interleave(groups, dim=2)
        beta = torch.sigmoid(self.in_proj_b(x))
        # The decay in fp32: exp() in the recurrence amplifies any rounding of it.
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float())
        y = state.recur(q, k, v, g, beta, self.scale)
        z = self.in_proj_z(x).reshape(batch, seq, spec.num_value_heads, spec.value_head_dim)
        return self.out_proj(self.norm(y, z).reshape(batch, seq, -1))


class BoundState:
    """One call's view of a LinearAttentionState: reads the buffers (zero at position 0), writes them back."""

    def __init__(self, owner: LinearAttentionState, continuing: torch.Tensor):
        self.owner = owner
        self.continuing = continuing  # bool [1]: false at position 0, where a new sequence starts

    def _past(self, buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # where, not a product with 0/1: a .pte's mutable buffers start as whatever its memory held, and
        # NaN x 0 is NaN. A scalar zero, not zeros_like(buffer): exporters fold that into a stored constant
        # as large as the state.
        return torch.where(self.continuing, buffer.to(dtype), 0.0)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out, past = causal_conv(self._past(self.owner.conv_state, x.dtype), x, weight)
        self.owner.conv_state.copy_(past.to(self.owner.conv_state.dtype))
        return out

    def recur(self, q, k, v, g, beta, scale: float) -> torch.Tensor:
        state = self.owner.recurrent_state
        out, new_state = ops.gated_delta_rule(q, k, v, g, beta, self._past(state, torch.float32), scale)
        state.copy_(new_state.to(state.dtype))
        return out


class LinearAttentionState(nn.Module):
    """The reference state of one linear-attention layer: buffers updated in place (mutable buffers
    in a .pte). conv_state holds the last K-1 conv inputs, recurrent_state the delta rule's matrix.
    A target that keeps the state otherwise subclasses it with its own dtypes and `Bound` (Core ML)."""

    Bound = BoundState

    def __init__(self, spec: LinearAttentionConfig, dtype: torch.dtype = torch.float32,
                 recurrent_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.register_buffer("conv_state", torch.zeros(1, spec.conv_dim, spec.conv_kernel - 1, dtype=dtype),
                             persistent=False)
        # The recurrence's state stays fp32 whatever the activations are: it integrates over the whole sequence.
        self.register_buffer("recurrent_state", torch.zeros(1, spec.num_value_heads, spec.key_head_dim,
                                                            spec.value_head_dim, dtype=recurrent_dtype),
                             persistent=False)

    def empty_like(self) -> "LinearAttentionState":
        return type(self)(self.spec, self.conv_state.dtype, self.recurrent_state.dtype)

    def bind(self, positions: torch.Tensor) -> Recurrence:
        return self.Bound(self, positions[:1] > 0)

    def reset(self) -> None:
        self.conv_state.zero_()
        self.recurrent_state.zero_()
