"""A statistical twin's own spread: how far the twin moves from itself under last-bit noise.

Some twins reproduce their runtime only statistically: XNNPACK's per-token int8 activations and
onnxruntime's accuracy-level-4 per-block int8 activations round discontinuously, so an fp32
summation-order difference (different kernels sum in a different order) flips a few roundings, and
the flips compound with depth. How much they compound depends on the model (depth, logit scale,
activation outliers), so no constant bound fits every checkpoint: bounds set on 24-layer synthetic
models rejected right artifacts of a real 30-layer model.

Here the expected drift is measured per export, at the model's own depth: the twin is run again
with every decoder layer's output moved by a few units in the last place (what a different
summation order does to a layer), on the same teacher-forced tokens, and compared with its
unperturbed run. The worst of a few such runs is the twin's spread; the artifact is then held to
the recipe's bounds loosened to the spread plus a margin (exporter.targets.spec.Spread), never
tighter than the stated ones. A wrong kernel (a flipped code, an ignored zero point, a wrong scale
dtype) moves the logits by far more than the spread at the depths measured in
bench/reports/twin_spread (python -m bench.twin_spread).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cpm_mobile.runtimes.check import CheckPlan, Observations, compare, teacher_forced_runs
from cpm_mobile.runtimes.torch_session import TorchSession

# Metrics the spread loosens: name -> (tolerance key, larger is better, how the margin applies).
# Amplitude metrics scale with the error's amplitude, KL with its square, top-1 misses ~ linearly.
_LOOSENED = {
    "min_sqnr_db": ("sqnr_db", "db"),
    "max_rel_logits": ("max_rel_logits", "amplitude"),
    "max_abs_logits": ("max_abs_logits", "amplitude"),
    "max_kl": ("kl", "power"),
    "max_ppl_rel_delta": ("ppl_rel_delta", "amplitude"),
    "min_top1": ("top1", "miss"),
}


@contextmanager
def input_noise(model: nn.Module, relative: float, seed: int) -> Iterator[None]:
    """Every linear's input x (inside the decoder layers) becomes x * (1 + u), u uniform in
    [-relative, relative]: what another summation order in the op before it does, seen where the
    discontinuity is (the linear's activation rounding). Perturbing only each layer's output
    (2**-21) left a 4-layer model's roundings untouched where onnxruntime's kernels flipped one
    (70 dB against the artifact's 48); at the linears' inputs, 2**-19 reproduces the artifact's
    drift (46-47 dB) on that model and at 24 layers alike (bench.twin_spread)."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32) * 2 - 1
        return (x * (1 + relative * noise).to(x.dtype), *args[1:])

    handles = [module.register_forward_pre_hook(hook) for module in model.layers.modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def twin_spread(twin: nn.Module, twin_observations: Observations, plan: CheckPlan, reference: Observations,
                spread: Any, tie_margin_rel: float, session: Callable[[], Any] | None = None) -> dict[str, Any]:
    """The worst metrics of `spread.perturbations` noisy runs of the twin against its clean run.
    session: what runs the twin on the plan (default the module itself; a vision-language check wraps it with
    its image prompts); the noise goes into the twin's own decoder layers either way."""
    worst: dict[str, Any] = {}
    for seed in range(spread.perturbations):
        with input_noise(twin, spread.relative, seed), torch.no_grad():
            noisy = teacher_forced_runs(session() if session is not None else TorchSession(twin), plan, reference)
        measured = compare(twin_observations, noisy, plan, tie_margin_rel)
        for key, (metric, kind) in _LOOSENED.items():
            if metric not in measured:
                continue
            value = float(measured[metric])
            larger_is_better = kind in ("db", "miss")
            if metric not in worst or (value < worst[metric] if larger_is_better else value > worst[metric]):
                worst[metric] = value
    return worst


def loosened(tolerances: dict[str, Any], spread_metrics: dict[str, Any], margin_db: float) -> dict[str, Any]:
    """The stated bounds, each loosened to what the spread plus a margin of `margin_db` allows."""
    amplitude = 10 ** (margin_db / 20)
    result = dict(tolerances)
    for key, (metric, kind) in _LOOSENED.items():
        bound, spread = tolerances.get(key), spread_metrics.get(metric)
        if bound is None or spread is None or not math.isfinite(spread):
            continue
        if kind == "db":
            result[key] = min(bound, spread - margin_db)
        elif kind == "miss":
            result[key] = min(bound, max(0.0, 1 - amplitude * (1 - spread)))
        else:
            result[key] = max(bound, spread * (amplitude ** 2 if kind == "power" else amplitude))
    return result
