"""Activation-aware scaling before the rounding (AWQ: Lin et al. 2024), folded into the float model.

Inputs with large activations make their weight columns matter more. For a linear y = W x whose input x is a
norm's output (or another linear's output), multiplying W's column i by s_i and the producer's channel i by
1 / s_i computes the same function and lets the rounding spend its levels on the columns that count. AWQ's
search: s = mean|x|^a, normalised to geometric mean 1, with the a in 0, 0.1 .. 1 whose rounded consumers
reproduce the float outputs best on calibration inputs (a = 0 is no scaling, so the search never does worse
by its own measure). The grid's rounding (GPTQ) then runs on the scaled weights.

The producers folded into (every one exact in real arithmetic, so the float model is unchanged):
- a decoder layer's input norm -> the attention's input linears (q/k/v, MLA's q and kv-a, Gated DeltaNet's
  in-projections: each reads the normed input only through these linears);
- its post-attention norm -> the FFN's input linears (gate/up; BlockFFN's router and up);
- a gated MLP's up_proj rows -> down_proj's columns (down reads silu(gate) * up, linear in up);
- grouped-query attention's v_proj rows -> o_proj's columns (attention and its output gate are linear in v per
  channel; o's columns of the query heads sharing a kv head take that head's one scale).
The changed norm gains are stored with the grid (WeightGrid.floats); the linears' changes are in their codes.

Why ours: torchao's AWQ (torchao.prototype.awq) keeps the scale as a multiply on the activation at run time,
per linear, and rounds with its own int4 layouts; AutoAWQ / llm-compressor run on transformers' module trees on
CUDA. What the targets carry is a WeightGrid of plain linears with nothing added to the graph: folding does that.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from cpm_mobile.exporter.models.attention import GroupedQueryAttention, MultiHeadLatentAttention
from cpm_mobile.exporter.models.ffn import BlockFFN, GatedMLP
from cpm_mobile.exporter.models.linear_attention import GatedDeltaNet
from cpm_mobile.exporter.models.norm import RMSNorm

# AWQ's grid is 20 steps on 2048 tokens; 10 steps on 512 sampled tokens measured the same within the windows' spread
# (minicpm-tiny with and without outliers) at a quarter of the cost: on the MiniCPM4-0.5B shape the one-pass
# calibration takes 383 s with the search against 225 s without (519 s at 20 steps on 1024 tokens).
ALPHAS = tuple(i / 10 for i in range(11))
SAMPLE_ROWS = 512  # calibration tokens whose outputs the search compares, spread over the windows (means: all)
MIN_SCALE = 1e-4

_NORM_FED = (GroupedQueryAttention, MultiHeadLatentAttention, GatedDeltaNet, GatedMLP, BlockFFN)


@dataclasses.dataclass
class Fold:
    """Producer channels scaled by 1 / s, the consumers' input columns by s."""

    producer: nn.Module  # an RMSNorm (its gain) or an nn.Linear (its output rows and bias)
    consumers: list[nn.Linear]
    group: int = 1  # consumer input channels per producer channel (query heads per kv head, GQA)
    head_dim: int = 0  # with group > 1: channels per head


def folds(layer: nn.Module) -> list[Fold]:
    """The scalings this decoder layer allows, in forward order."""
    out = []
    attention = layer.linear_attn if layer.linear else layer.self_attn
    for norm, block in ((layer.input_layernorm, attention), (layer.post_attention_layernorm, layer.mlp)):
        if isinstance(norm, RMSNorm) and isinstance(block, _NORM_FED):
            out.append(Fold(norm, _input_linears(block)))
        if isinstance(block, GroupedQueryAttention):
            group = block.num_heads // block.num_kv_heads
            out.append(Fold(block.v_proj, [block.o_proj], group, block.head_dim))
        if isinstance(block, GatedMLP):
            out.append(Fold(block.up_proj, [block.down_proj]))
    return out


def _input_linears(block: nn.Module) -> list[nn.Linear]:
    if isinstance(block, GroupedQueryAttention):
        return [block.q_proj, block.k_proj, block.v_proj]
    if isinstance(block, MultiHeadLatentAttention):
        first = block.q_proj if block.q_lora_rank is None else block.q_a_proj
        return [first, block.kv_a_proj_with_mqa]
    if isinstance(block, GatedDeltaNet):
        return [block.in_proj_qkv, block.in_proj_z, block.in_proj_b, block.in_proj_a]
    if isinstance(block, GatedMLP):
        return [block.gate_proj, block.up_proj]
    return [block.router_proj, block.up_proj]  # BlockFFN


class _Inputs:
    """Mean |x| per input channel over every calibration token, and a sample of rows, of one linear's input: the
    same number of evenly spaced tokens from every window, so that the sample spans the calibration text."""

    def __init__(self, width: int, per_window: int):
        self.abs_sum = torch.zeros(width, dtype=torch.float64)
        self.count = 0
        self.per_window = per_window
        self.sample: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.count += x.shape[0]
        start = 1 if x.shape[0] > 1 else 0  # not the BOS position: an attention sink's outsized activations
        picked = torch.linspace(start, x.shape[0] - 1, min(self.per_window, x.shape[0] - start)).round().long()
        self.sample.append(x[picked].clone())

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    def rows_sample(self) -> torch.Tensor:
        return torch.cat(self.sample)


def scale_layer(layer: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], hidden: list[torch.Tensor],
                fake_quant: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Search and fold every scaling of `layer` (changed in place) on the inputs `run` gives it over `hidden`.

    fake_quant: weight [out, in] -> the weight after the grid's rounding (the search's measure).
    Returns the norm gains it changed, by parameter name within the layer ("input_layernorm.weight"): the
    linears' changes are in their weights, which the grid's codes hold."""
    plan = folds(layer)
    per_window = -(-SAMPLE_ROWS // max(len(hidden), 1))
    inputs = {id(f): _Inputs(f.consumers[0].in_features, per_window) for f in plan}
    handles = [f.consumers[0].register_forward_hook(lambda m, args, out, i=inputs[id(f)]: i.add(args[0]))
               for f in plan]
    try:
        with torch.no_grad():
            for h in hidden:
                run(h)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for fold in plan:
            seen = inputs[id(fold)]
            _apply(fold, _search(fold, seen.mean_abs(), seen.rows_sample(), fake_quant))
    norms = {fold.producer for fold in plan if isinstance(fold.producer, RMSNorm)}
    return {f"{name}.weight": module.weight.detach().clone() for name, module in layer.named_modules()
            if module in norms}


def _per_producer(fold: Fold, per_input: torch.Tensor) -> torch.Tensor:
    """Consumer-input statistics on the producer's channels (GQA: the mean over the heads sharing a kv head)."""
    if fold.group == 1:
        return per_input
    return per_input.view(-1, fold.group, fold.head_dim).mean(1).reshape(-1)


def _per_input(fold: Fold, per_producer: torch.Tensor) -> torch.Tensor:
    if fold.group == 1:
        return per_producer
    return per_producer.view(-1, 1, fold.head_dim).expand(-1, fold.group, -1).reshape(-1)


def _search(fold: Fold, mean_abs: torch.Tensor, x: torch.Tensor,
            fake_quant: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The producer's scales whose exponent gives the least output error after rounding (ones at exponent 0)."""
    magnitude = _per_producer(fold, mean_abs).clamp(min=MIN_SCALE)
    weights = [c.weight.float() for c in fold.consumers]
    targets = [x @ w.T for w in weights]
    best_error, best = float("inf"), torch.ones_like(magnitude)
    for alpha in ALPHAS:
        scales = magnitude.pow(alpha)
        scales = (scales / (scales.max() * scales.min()).sqrt()).clamp(min=MIN_SCALE)
        s = _per_input(fold, scales)
        error = sum(float(((x / s) @ fake_quant(w * s).T - y).pow(2).sum()) for w, y in zip(weights, targets))
        if error < best_error:
            best_error, best = error, scales
    return best


def _apply(fold: Fold, scales: torch.Tensor) -> None:
    s = _per_input(fold, scales)
    producer = fold.producer
    if isinstance(producer, RMSNorm):
        producer.weight.div_(scales.to(producer.weight.dtype))
    else:
        producer.weight.div_(scales.to(producer.weight.dtype)[:, None])
        if producer.bias is not None:
            producer.bias.div_(scales.to(producer.bias.dtype))
    for consumer in fold.consumers:
        consumer.weight.mul_(s.to(consumer.weight.dtype)[None, :])

