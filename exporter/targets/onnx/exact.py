"""The exact half of a quantised graph's check: its stored weights through onnxruntime's fp32 path.

MatMulNBits at accuracy_level 4 rounds its inputs to int8 per block; the twin reproduces that only
statistically, and the expected drift grows with depth (exporter/spread.py calibrates for it). So a
small fault (one code, a zero point, a scale's dtype) could hide in that drift at real depth. This
check removes the discontinuity instead: the same graph, every MatMulNBits with fp32 inputs
(accuracy_level unset: onnxruntime dequantises the stored codes, scales and zero points and
multiplies in fp32), against the twin without its activation rounding. Both sides are then smooth
fp32 computations of the same weights, so they agree to fp32 summation noise at any depth, and one
flipped code moves the logits by orders of magnitude more (tests/test_twin_spread.py).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional as F

from cpm_mobile.exporter.models.variant import derive
from cpm_mobile.exporter.targets.onnx.quant import MS_DOMAIN, Int8ActivationLinear, _attributes, fp32_activations
from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, teacher_forced_runs
from cpm_mobile.runtimes.onnx import OnnxSession
from cpm_mobile.runtimes.torch_session import TorchSession

# max |graph - twin| / max |twin logit| with fp32 activations on both sides: fp32 summation noise
# (the fp32 recipe's ONNX bound is 2e-5 at 24 layers); one flipped 4-bit code measures >= 1e-3.
MAX_REL_LOGITS = 1.0e-4
PROBE_TOKENS = 48  # one prefill of the probe, then PROBE_STEPS single-token steps through the cache
PROBE_STEPS = 8


class _Fp32Linear(nn.Module):
    def __init__(self, rounded: Int8ActivationLinear):
        super().__init__()
        self.weight, self.bias = rounded.weight, rounded.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def rounds_activations(graph: ir.Model) -> bool:
    return any(node.domain == MS_DOMAIN and node.op_type == "MatMulNBits"
               and _attributes(node).get("accuracy_level", 0) == 4 for node in graph.graph)


def exact_weight_faults(graph: ir.Model, artifact: dict[str, Any], twin: nn.Module) -> list[str]:
    """Breaches of the stored weights' exact check (empty when it holds or does not apply)."""
    if not rounds_activations(graph):
        return []
    exact_twin = derive(twin, lambda name, module: _Fp32Linear(module)
                        if isinstance(module, Int8ActivationLinear) else None)
    vocab = twin.config.vocab_size
    tokens = torch.randint(0, vocab, (PROBE_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    plan = CheckPlan(prompts=[tokens], max_new_tokens=PROBE_STEPS)
    with torch.no_grad():
        expected = greedy_runs(TorchSession(exact_twin), plan)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        ir.save(fp32_activations(graph), path, external_data="model.onnx.data")
        observed = teacher_forced_runs(OnnxSession(path, artifact["io"]), plan, expected)
    measured = compare(expected, observed, plan)
    if measured["max_rel_logits"] <= MAX_REL_LOGITS:
        return []
    return [f"stored weights: with fp32 activations the graph departs from the twin's weights by "
            f"max_rel_logits {measured['max_rel_logits']:.3g} > {MAX_REL_LOGITS:g} (a code, scale or zero point "
            f"differs)"]
