"""The one checker of a checkpoint's own integer grid (GPTQ, QAT fake-quant, BitCPM) against what a
target's kernels carry losslessly (its GridCarrier, exporter/targets/<name>/spec.py).

Every refusal is found before any work: the codes' width, act-order groups, zero points, block sizes,
a scheme field that contradicts the grid, and a rounding option that would round the weights again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.targets.spec import GridCarrier


@dataclass(frozen=True)
class Refusal:
    field: str  # the recipe field at fault, e.g. "quantization.group_size"
    problem: str

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


def grid_refusals(model: Any, scheme: Any, carrier: GridCarrier | None, target: str,
                  precision: str = "fp32") -> list[Refusal]:
    """Why this target cannot carry the model's grid with this scheme; [] when it can (or there is no grid)."""
    grid = model.config.weight_grid
    if grid is None:
        return []
    where = f"{target} target, scheme {scheme.scheme}"
    if carrier is None:
        return [Refusal("quantization", f"{where}: the {target} target cannot carry a checkpoint's grid")]
    if scheme.scheme in carrier.refused_schemes:
        return [Refusal("quantization.scheme", f"{where}: " + carrier.refused_schemes[scheme.scheme].format(
            grid=grid.describe()))]
    bits = carrier.scheme_bits[scheme.scheme]
    names = sorted(grid.linears)
    if carrier.covers_all_linears:
        linears = {f"{name}.weight" for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and name != "lm_head"}
        missing = sorted(linears - set(grid.linears))
        if missing:
            return [Refusal("quantization", f"{where}: the checkpoint's grid does not cover {missing[0]}")]
        names = sorted(linears)
    kernel = carrier.kernel
    group_field = carrier.group_field
    explicit_group = group_field in scheme.model_fields_set
    checks: list[tuple[str, Callable[[Any], bool], Callable[[str, Any], str]]] = [
        ("quantization", lambda g: g.act_order,
         lambda n, g: f"{n} is act-order GPTQ (g_idx permutes the inputs); {kernel} blocks are consecutive "
                      f"inputs, so it cannot carry it losslessly"),
        ("quantization.scheme", lambda g: g.bits > bits and g.bits not in carrier.wide_bits,
         lambda n, g: f"the checkpoint's grid is {grid.describe()}; {bits}-bit codes cannot hold it (use int4)"),
        ("quantization.scheme", lambda g: scheme.scheme == "ternary" and not g.ternary,
         lambda n, g: f"the checkpoint's grid is not ternary ({grid.describe()}); use int4"),
    ]
    if carrier.symmetric_only:
        checks.append(("quantization", lambda g: not g.symmetric, lambda n, g: f"{n}'s grid has {carrier.symmetric_only}"))
    if carrier.checks_zero_range:
        checks.append(("quantization", lambda g: int(g.zeros.max()) >= 1 << g.bits,
                       lambda n, g: f"{n} has a zero point of {int(g.zeros.max())} (a GPTQ v1 zero of 0 stored "
                                    f"as -1), beyond {g.bits}-bit zero points"))
    if carrier.block_sizes is not None:
        sizes = ", ".join(map(str, carrier.block_sizes))
        checks.append(("quantization", lambda g: g.group_size not in carrier.block_sizes or (
            scheme.scheme == "ternary" and carrier.min_ternary_block and g.group_size < carrier.min_ternary_block),
            lambda n, g: f"{n} has groups of {g.group_size}; {kernel} runs blocks of {sizes} only"))
    if carrier.block_multiple is not None:
        checks.append(("quantization", lambda g: not _per_channel(g) and g.group_size % carrier.block_multiple,
                       lambda n, g: f"{n} has groups of {g.group_size}; {kernel}'s 4-bit kernels take blocks of a "
                                    f"multiple of {carrier.block_multiple}"))
    if explicit_group:
        value = getattr(scheme, group_field)
        checks.append((f"quantization.{group_field}",
                       lambda g: value != g.group_size and not (_per_channel(g) and value is None),
                       lambda n, g: f"{value} contradicts the checkpoint's grid (groups of {g.group_size}); leave "
                                    f"{group_field} unset to use it"))
    if carrier.symmetric_field and "symmetric" in scheme.model_fields_set and getattr(scheme, "symmetric", False):
        checks.append(("quantization.symmetric", lambda g: not g.symmetric,
                       lambda n, g: "true contradicts the checkpoint's grid, which has zero points; leave symmetric "
                                    "unset to use it"))
    if carrier.fp16_scales_exact and precision == "fp16":
        checks.append(("precision", lambda g: not torch.equal(g.scales.to(torch.float16).to(torch.float32), g.scales),
                       lambda n, g: f"{n}'s scales are not exact in fp16 ({kernel} takes scales in the activations' "
                                    f"dtype); export fp32"))
    refusals = []
    for field, fails, say in checks:
        culprit = next((name for name in names if fails(grid.linears[name])), None)
        if culprit is not None:
            refusals.append(Refusal(field, f"{where}: {say(culprit, grid.linears[culprit])}"))
    for field, keep in carrier.rerounding_fields.items():
        value = getattr(scheme, field, keep)
        if field in scheme.model_fields_set and value != keep:
            refusals.append(Refusal(f"quantization.{field}", f"{where}: the checkpoint's grid is exported as it is; "
                                                             f"'{value}' would round the weights again"))
    return refusals


def check_grid(model: Any, scheme: Any, carrier: GridCarrier | None, target: str, precision: str = "fp32") -> None:
    """The first refusal as an InputError (one line naming the recipe field), for callers that stop at one."""
    refusals = grid_refusals(model, scheme, carrier, target, precision)
    if refusals:
        raise InputError(refusals[0].field, refusals[0].problem)


def _per_channel(linear: Any) -> bool:
    return linear.group_size == linear.codes.shape[1]
