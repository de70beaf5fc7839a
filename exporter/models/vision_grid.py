"""A vision encoder's linears on an 8-bit grid, rounded once in PyTorch and carried exactly by every format.

Why a grid and not each format's own int8 quantiser: XNNPACK's int8 linears and onnxruntime's accuracy_level 4
round the activations too (per token / per block, discontinuously), so their twins match only statistically,
and each format would round the weights its own way. One grid (symmetric codes, one fp16 scale per 32 input
columns, as llama.cpp's Q8_0 and our weight-only kernel linear_q8x4 store them) with fp32 activations makes
the vision encoder's twin exact in every format: the eager encoder with the grid's dequantised weights.

Round to nearest, not GPTQ: an 8-bit grid's rounding costs the encoder's features ~45 dB SQNR already (the
report states it per export); calibration on images would need images the bundle does not have.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from cpm_mobile.exporter.models.grid import LinearGrid, WeightGrid

SCALE_DTYPE = torch.float16  # what linear_q8x4's tiles store; MatMulNBits and Core ML hold fp16 values exactly
GRID_SOURCE = "vision encoder: 8-bit round to nearest, fp16 block scales"


def round_to_grid(weight: torch.Tensor, bits: int, group_size: int) -> LinearGrid:
    """Symmetric codes with one scale per `group_size` input columns, scale = max |w| / (2**(bits-1) - 1) in
    fp16: the calibration's group rounding to nearest (exporter/calibration.py gptq_linear without a Hessian)."""
    from cpm_mobile.exporter.calibration import GroupRounding, gptq_linear

    top = float((1 << (bits - 1)) - 1)
    return gptq_linear(weight, None, GroupRounding(bits, group_size, True, SCALE_DTYPE, divisors=(top,)))


def vision_grid(vision: nn.Module, bits: int, group_size: int) -> tuple[WeightGrid, list[str]]:
    """The grid of every linear whose input width `group_size` divides, and the names of those left in fp32."""
    linears, kept = {}, []
    for name, module in vision.named_modules():
        if isinstance(module, nn.Linear):
            if module.in_features % group_size:
                kept.append(name)
            else:
                linears[f"{name}.weight"] = round_to_grid(module.weight, bits, group_size)
    return WeightGrid(GRID_SOURCE, linears), kept


def gridded(vision: nn.Module, grid: WeightGrid,
            carrier: Callable[[nn.Linear, LinearGrid], nn.Module] | None = None) -> nn.Module:
    """A copy of `vision` whose gridded linears hold the grid: by default its dequantised weights (the twin of
    every format's vision encoder, fp32 activations), or the module `carrier` builds from the linear and its
    grid (a target's kernel module). `vision` is not changed."""
    variant = copy.deepcopy(vision)
    modules = dict(variant.named_modules())
    for name, linear in grid.linears.items():
        path = name.removesuffix(".weight")
        module = modules.get(path)
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != tuple(linear.codes.shape):
            raise ValueError(f"the vision grid's {name} is not a linear of this vision encoder")
        if carrier is None:
            module.weight = nn.Parameter(linear.dequantize(), requires_grad=False)
        else:
            parent, _, child = path.rpartition(".")
            setattr(modules[parent] if parent else variant, child, carrier(module, linear))
    return variant
