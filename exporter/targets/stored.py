"""The tensors an artifact stores, counted from a model's shapes: what every target's size rule shares."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from cpm_mobile.exporter.models.transformer import CausalLM

FLOAT_BYTES = {"fp32": 4, "fp16": 2}
BF16, FP32 = 2, 4
LM_HEAD, EMBEDDING = "lm_head", "embed_tokens"


@dataclass(frozen=True)
class Stored:
    """One tensor as an artifact stores it."""

    name: str
    values: int
    bits: int
    scales: int = 0
    scale_bytes: int = 0
    zero_point_bytes: int = 0

    @property
    def bytes(self) -> int:
        return math.ceil(self.values * self.bits / 8) + self.scales * self.scale_bytes + self.zero_point_bytes


def matrices(model: CausalLM) -> Iterable[tuple[str, nn.Module]]:
    """(module name, module) of the embedding and every linear, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            yield name, module


def grid_width(model: CausalLM, name: str) -> int | None:
    """The code width the model's grid gives module `name` (a mixed grid's 8-bit linears), None off the grid."""
    grid = model.config.weight_grid
    entry = grid.linears.get(f"{name}.weight") if grid is not None else None
    return None if entry is None else entry.bits


# The sparse pass's expert tables (exporter/passes/blockffn_sparse.py, exporter/kernels/fused_ffn.py):
# raw rows, quantised by the sparse quantisers (exporter/quant/sparse_*.py) when the recipe quantises.
EXPERT_TABLES = ("up_weight", "down_rows", "up_experts", "down_experts")


def expert_tables(model: CausalLM) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in EXPERT_TABLES]


def rest(model: CausalLM, bits: int, quantised_tables: bool = False) -> list[Stored]:
    """Every tensor besides the matrices' weights, unquantised: norms, biases, a pass's raw weight rows
    (unless the recipe quantises them), RoPE tables. The KV caches are state: no data is stored for them."""
    weights = {id(module.weight) for _, module in matrices(model)}
    if quantised_tables:
        weights |= {id(p) for _, p in expert_tables(model)}
    rest = [Stored(name, p.numel(), bits) for name, p in model.named_parameters() if id(p) not in weights]
    rest += [Stored(name, b.numel(), bits) for name, b in model.named_buffers() if not name.startswith("kv_caches.")]
    return rest


def float_tensor(name: str, module: nn.Module, bits: int) -> Stored:
    return Stored(name, module.weight.numel(), bits)
