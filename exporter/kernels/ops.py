"""The AOT definition of cpm_mobile::sparse_expert_ffn for torch.export (the one place it is defined:
defining the namespace twice in a process raises).

sparse_expert_ffn(x [N, H], scores [N, E], up [E*de, H], down [E*de, H]) -> [N, H]
    out[t] = sum_{e: scores[t, e] != 0} sum_j SiLU(x[t] . up[e*de+j]) * scores[t, e] * down[e*de+j]

`scores` are BlockFFN's router output (ReLU + RMSNorm: idle experts score an exact zero), `up` the
dense up projection's weight, `down` the dense down projection's weight transposed (one row per
expert unit). The PyTorch implementation here gives eager runs and export tracing the same numbers
as the C++ kernel (sparse_expert_ffn.cpp) that a .pte calls; it computes only the experts some
token activates, like the kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAMESPACE = "cpm_mobile"
OP_NAME = "sparse_expert_ffn"
KERNEL = f"{NAMESPACE}::{OP_NAME}.out"  # the name the .pte's plan holds and the C++ library registers

_library = torch.library.Library(NAMESPACE, "DEF")
_library.define(f"{OP_NAME}(Tensor x, Tensor scores, Tensor up, Tensor down) -> Tensor")
_library.define(f"{OP_NAME}.out(Tensor x, Tensor scores, Tensor up, Tensor down, *, Tensor(a!) out) -> Tensor(a!)")


def _compute(x: torch.Tensor, scores: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    experts = scores.shape[1]
    width = up.shape[0] // experts
    ids = torch.nonzero((scores != 0).any(dim=0)).reshape(-1)
    units = (ids[:, None] * width + torch.arange(width)).reshape(-1)  # the active experts' rows
    inner = F.silu(x @ up.index_select(0, units).t()) * scores.index_select(1, ids).repeat_interleave(width, dim=1)
    return inner @ down.index_select(0, units)


@torch.library.impl(_library, OP_NAME, "CompositeExplicitAutograd")
def _functional(x, scores, up, down):
    return _compute(x, scores, up, down)


@torch.library.impl(_library, OP_NAME, "Meta")
def _functional_meta(x, scores, up, down):
    return torch.empty_like(x)


@torch.library.impl(_library, f"{OP_NAME}.out", "CompositeExplicitAutograd")
def _out(x, scores, up, down, *, out):
    result = _compute(x, scores, up, down)
    out.resize_(result.shape)
    return out.copy_(result)


@torch.library.impl(_library, f"{OP_NAME}.out", "Meta")
def _out_meta(x, scores, up, down, *, out):
    out.resize_(x.shape)
    return out


def sparse_expert_ffn(x: torch.Tensor, scores: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return torch.ops.cpm_mobile.sparse_expert_ffn.default(x, scores, up, down)
