"""Which body linears keep 8-bit codes in a mixed-precision grid: measured, per linear, under a size budget.

Sensitivity of a linear: the mean per-token KL(float model || the float model with that linear alone rounded
to the calibration's low bits, to nearest) on calibration windows. Rounding one linear at a time measures what
its error does to the output through everything after it (attention, norms, the rest of the stack), which a
per-layer proxy (weight error, or error weighted by the input Hessian) does not; it costs one forward pass
per linear and window. Selection: the linears with the most KL per weight stay at the high width, in that
order, while the body's mean code width stays within the budget (a greedy knapsack: the budget is a weight
count and the value of a linear is its KL). llama.cpp's Q4_K_M chooses by tensor kind instead (attn_v and
half of ffn_down at 6 bits); measuring lets the choice follow the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cpm_mobile.exporter.targets.base import Progress, no_progress


@dataclass(frozen=True)
class Choice:
    high: frozenset[str]  # weight names ("layers.0.mlp.down_proj.weight") kept at the high width
    sensitivity: Mapping[str, float]  # name -> KL with that linear alone at the low width
    bits_per_weight: float  # the body's mean code width with this choice


def body_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Weight name -> module of every linear the calibration rounds (all but lm_head)."""
    return {f"{name}.weight": module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name != "lm_head"}


def _log_probs(model: nn.Module, windows: list[list[int]]) -> list[torch.Tensor]:
    out = []
    for window in windows:
        model.reset_cache()
        logits = model(torch.tensor([window]), torch.zeros(1, dtype=torch.int64))
        out.append(F.log_softmax(logits[0].to(torch.float64), dim=-1))
    model.reset_cache()
    return out


def sensitivities(model: nn.Module, windows: list[list[int]], rounded: Callable[[torch.Tensor], torch.Tensor],
                  progress: Progress = no_progress) -> dict[str, float]:
    """name -> mean token KL(float || float with that linear's weight replaced by rounded(weight)).
    The model's weights are restored after each measurement (and on error)."""
    linears = body_linears(model)
    result: dict[str, float] = {}
    with torch.no_grad():
        reference = _log_probs(model, windows)
        tokens = sum(r.shape[0] for r in reference)
        for index, (name, module) in enumerate(linears.items()):
            progress(f"mixed precision: sensitivity {index + 1}/{len(linears)}", index / len(linears))
            original = module.weight.data
            module.weight.data = rounded(original).to(original.dtype)
            try:
                quantised = _log_probs(model, windows)
            finally:
                module.weight.data = original
            kl = sum(float((r.exp() * (r - q)).sum()) for r, q in zip(reference, quantised))
            result[name] = kl / tokens
    return result


def choose(sensitivity: Mapping[str, float], sizes: Mapping[str, int], low: int, high: int,
           bits_per_weight: float) -> Choice:
    """The linears kept at `high` bits: most KL per weight first, while the mean width stays <= the budget."""
    total = sum(sizes.values())
    allowed = (bits_per_weight - low) / (high - low) * total  # weights that may be at the high width
    kept: set[str] = set()
    used = 0
    for name in sorted(sensitivity, key=lambda n: sensitivity[n] / sizes[n], reverse=True):
        if used + sizes[name] <= allowed:
            kept.add(name)
            used += sizes[name]
    mean = low + (high - low) * used / total if total else float(low)
    return Choice(frozenset(kept), dict(sensitivity), mean)
