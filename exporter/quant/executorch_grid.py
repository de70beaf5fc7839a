"""What of a checkpoint's own weight grid (exporter/models/grid.py) a .pte can carry through XNNPACK.

XNNPACK runs 4-bit linears as int8 dynamic activations x symmetric int4 codes in blocks of a
multiple of 32 inputs (or per output channel), and ignores a weight zero point (recipes/
quant_executorch.py); ExecuTorch stores the block scales as bf16. So the codes of a symmetric 4-bit
(or ternary) grid are carried exactly and its scales rounded to bf16: exact for bf16 scales (QAT
and BitCPM checkpoints trained in bf16), 3 mantissa bits short for GPTQ's fp16 scales (measured
deviation in README). Everything else is refused before any work.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from cpm_mobile.exporter.errors import InputError

XNNPACK_BLOCK = 32


def check_grid(model: Any, scheme: Any) -> None:
    grid = model.config.weight_grid
    if grid is None:
        return
    where = f"executorch target, scheme {scheme.scheme}"
    if scheme.scheme == "int8":
        raise InputError("quantization.scheme", f"{where}: XNNPACK runs 8-bit weights per output channel only, "
                                                f"so the checkpoint's grid ({grid.describe()}) needs scheme int4")
    linears = [f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name != "lm_head"]
    missing = [name for name in linears if name not in grid.linears]
    if missing:
        raise InputError("quantization", f"{where}: the checkpoint's grid does not cover {missing[0]}")
    for name in linears:
        linear = grid.linears[name]
        if linear.act_order:
            raise InputError("quantization", f"{where}: {name} is act-order GPTQ (g_idx permutes the inputs); "
                                             f"XNNPACK blocks are consecutive inputs, so it cannot carry it losslessly")
        if linear.bits > 4:
            raise InputError("quantization", f"{where}: {name} has {linear.bits}-bit codes; XNNPACK's blockwise "
                                             f"kernels take 4-bit codes only")
        if scheme.scheme == "ternary" and not linear.ternary:
            raise InputError("quantization.scheme", f"{where}: the checkpoint's grid is not ternary "
                                                    f"({grid.describe()}); use int4")
        if not linear.symmetric:
            raise InputError("quantization", f"{where}: {name}'s grid has zero points, which XNNPACK ignores "
                                             f"(silently wrong output); only symmetric grids can be carried")
        per_channel = linear.group_size == linear.codes.shape[1]
        if not per_channel and linear.group_size % XNNPACK_BLOCK:
            raise InputError("quantization", f"{where}: {name} has groups of {linear.group_size}; XNNPACK's "
                                             f"4-bit kernels take blocks of a multiple of {XNNPACK_BLOCK}")
        if "group_size" in scheme.model_fields_set and scheme.group_size != linear.group_size \
                and not (per_channel and scheme.group_size is None):
            raise InputError("quantization.group_size", f"{where}: {scheme.group_size} contradicts the checkpoint's "
                                                        f"grid (groups of {linear.group_size}); leave group_size unset")
    if "rounding" in scheme.model_fields_set and scheme.rounding == "hqq":
        raise InputError("quantization.rounding", f"{where}: the checkpoint's grid is exported as it is; "
                                                  f"'hqq' would round the weights again")
