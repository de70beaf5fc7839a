"""The ExecuTorch quantisation of the fused sparse experts (FusedSparseBlockFFN -> QuantisedFusedSparseBlockFFN).

The experts' codes are the codes the recipe's dense quantiser gives the dense BlockFFN's up
[E*de, H] and down [H, E*de] weights: the same builder quantize_for_executorch uses for every
linear is applied to those two weights as linears, so a sparse and a dense artifact of one model
and scheme store the same codes and scales (int8: one fp32 scale per output channel; int4 and
ternary: blocks of `group_size` along the input dim, scales rounded to bf16 as XNNPACK stores
them) and differ only in the kernel: cpm_mobile::sparse_expert_ffn_int8 / _int4 multiply them with
fp32 activations where XNNPACK's linears round activations to int8 per token. The down codes are
stored transposed ([E*de, H], one row per expert unit), int4 codes two per byte (ops.pack_int4).
The router is quantised like any other linear (XNNPACK runs it).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.kernels import ops
from cpm_mobile.exporter.kernels.fused_ffn import FusedSparseBlockFFN, QuantisedFusedSparseBlockFFN

LinearBuilder = Callable[[nn.Linear], nn.Linear]  # nn.Linear -> nn.Linear holding a torchao weight


def check_sparse_fits(model: nn.Module, group_size: int | None) -> None:
    """The fused experts' blocks fit their widths (the down projection's input dim, the int4 kernel's chunks)."""
    for name, module in model.named_modules():
        if isinstance(module, FusedSparseBlockFFN):
            units = module.num_experts * module.expert_size
            if group_size is not None and units % group_size:
                raise InputError("quantization.group_size", f"{group_size} does not divide the input dim {units} "
                                                            f"of {name}.down_proj")


def sparse_ffn_plan(model: nn.Module, linear_plan: dict[str, LinearBuilder],
                    group_size: int | None) -> dict[str, Callable]:
    """Module name -> builder of the quantised replacement of each FusedSparseBlockFFN, whose weights
    are quantised by its router's builder from `linear_plan` (the body linears' builder)."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedSparseBlockFFN):
            units = module.num_experts * module.expert_size  # the dense down projection's input dim
            if group_size is not None and units % group_size:
                raise InputError("quantization.group_size", f"{group_size} does not divide the input dim {units} "
                                                            f"of {name}.down_proj")
            builder = linear_plan[f"{name}.router_proj"]
            plan[name] = lambda m, b=builder, n=name: quantise_fused(m, b, n)
    return plan


def quantise_fused(fused: FusedSparseBlockFFN, build: LinearBuilder, name: str) -> QuantisedFusedSparseBlockFFN:
    up = build(_as_linear(fused.up_weight)).weight  # [E*de, H]
    down = build(_as_linear(fused.down_rows.t())).weight  # [H, E*de]: the dense down projection
    bits = 4 if up.target_dtype == torch.int4 else 8  # the codes' width (ternary: 4-bit codes)
    if bits == 8:
        return QuantisedFusedSparseBlockFFN(fused, build(fused.router_proj), 8, up.qdata.contiguous(),
                                            up.scale.reshape(-1).contiguous(), down.qdata.t().contiguous(),
                                            down.scale.reshape(-1).contiguous())
    hidden = fused.hidden_size
    if hidden % ops.INT4_CHUNK:
        raise InputError("quantization", f"{name}: the int4 sparse kernel packs rows in chunks of {ops.INT4_CHUNK}, "
                                         f"but the hidden size is {hidden}")
    # 4-bit: XNNPACK's scales are bf16 (exporter/targets/executorch/quant.py rounds them so); stored as such.
    return QuantisedFusedSparseBlockFFN(
        fused, build(fused.router_proj), 4, ops.pack_int4(up.qdata), up.scale.to(torch.bfloat16).contiguous(),
        ops.pack_int4(down.qdata.t().contiguous()), down.scale.t().to(torch.bfloat16).contiguous())


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    return linear


def describe_sparse(model: nn.Module) -> str:
    """The twin description's note on the sparse experts ('' when the model has none)."""
    bits = sorted({m.bits for m in model.modules() if isinstance(m, QuantisedFusedSparseBlockFFN)})
    if not bits:
        return ""
    return (f"; sparse experts: the same int{bits[0]} codes in cpm_mobile::{ops.QUANTISED_OPS[bits[0]]} "
            "(dequantised rows, fp32 activations, not XNNPACK's int8 activation rounding)")
