"""What each recipe's artifacts weigh, predicted from the checkpoint's shapes alone (no export, no tracing).

Per stored tensor: codes x bits / 8 + scales (in the dtype the format stores them) + zero points,
plus every unquantised tensor (norms, biases, RoPE tables, unquantised embedding / lm_head) in the
format's float dtype, plus the format's own overhead (graph, program). The shapes come from a
CausalLM built on the meta device (free for any size); which tensor gets which bits, block and scale
dtype follows the quantisers:

- ExecuTorch (.pte, exporter/quant/executorch.py): torchao weights through XNNPACK. Linears: codes
  at the scheme's bits (ternary: 4-bit codes, the narrowest XNNPACK runs); 4-bit block scales bf16
  (XNNPACK's serialiser), 8-bit per-channel scales fp32. Embedding: ExecuTorch's embedding_byte /
  embedding_4bit tables with fp32 scales. A tied embedding is two tensors in a .pte (the gather's
  and the lm_head's), quantised or not.
- ONNX (exporter/quant/onnx.py): MatMulNBits per linear (fp32 scales per block, packed zero points
  when asymmetric, fp32 ones for HQQ), lm_head at lm_head_bits; GatherBlockQuantized for the
  embedding, which reads the lm_head's own codes when tied at the same bits (one table in the file).
  An unquantised tied table is one initializer.
- Core ML (exporter/quant/coreml.py, expected_weight_bytes): constexpr_blockwise_shift_scale codes
  with scales (and offsets when asymmetric) in the program's precision, palettes' LUTs; a tied
  table is one constant. Unquantised programs store every tensor in their precision.

The passes a recipe applies (blockffn_sparse) regroup weights without changing what is stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.passes import apply_passes
from cpm_mobile.recipes.schema import CoreMLSpec, ExecuTorchSpec, OnnxSpec, load_recipe, recipe_names

FLOAT_BYTES = {"fp32": 4, "fp16": 2}
# The formats' own bytes beyond the tensors, (fixed, per decoder layer), fitted to exports of minicpm-tiny's
# shape at 1, 2 and 8 layers (fp32 and int4). ONNX: the graph, ~1 KB of exporter metadata per node
# (95 KB a layer fp32, 86 KB int4, 29 KB fixed): 5 % of the fp32 embedded models, 15-20 % of their
# int4 files, nothing at 0.5B. Core ML: model.mlmodel (the program, 19-21 KB a layer, 12 KB fixed) and
# weight.bin's blob headers and alignment (~20 KB). A .pte's program and tables are 2.5-3.5 % of the
# embedded models' (measured 65-76 KB at 4 layers) and left out.
GRAPH_OVERHEAD_BYTES = {"onnx": (29_000, 90_000), "coreml": (32_000, 20_000), "executorch": (0, 0)}
# The sparse pass's ONNX gather form adds nodes (NonZero, Gather, the union of active experts): measured
# 52 KB (blockffn-tiny int4-sparse) to 82 KB (a 2-layer MLA fp32-sparse) more graph per sparse layer.
ONNX_SPARSE_LAYER_BYTES = 65_000
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


@dataclass(frozen=True)
class ArtifactSize:
    recipe: str
    target: str
    bytes: int
    fp32_ratio: float | None  # against the fp32 recipe's artifact of the same target


def shape_model(config: ModelConfig, tied: bool, max_seq_len: int) -> CausalLM:
    """The CausalLM of this config on the meta device: every parameter's and buffer's shape, no memory."""
    with torch.device("meta"):
        model = CausalLM(config, max_seq_len=max_seq_len)
    if tied:
        model.tie_embeddings()
    return model


def _matrices(model: CausalLM) -> Iterable[tuple[str, nn.Module]]:
    """(module name, module) of the embedding and every linear, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            yield name, module


# The sparse pass's expert tables (exporter/passes/blockffn_sparse.py, exporter/kernels/fused_ffn.py):
# raw rows, quantised by the sparse quantisers (exporter/quant/sparse_*.py) when the recipe quantises.
EXPERT_TABLES = ("up_weight", "down_rows", "up_experts", "down_experts")


def _expert_tables(model: CausalLM) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in EXPERT_TABLES]


def _rest(model: CausalLM, bits: int, quantised_tables: bool = False) -> list[Stored]:
    """Every tensor besides the matrices' weights, unquantised: norms, biases, a pass's raw weight rows
    (unless the recipe quantises them), RoPE tables. The KV caches are state: no data is stored for them."""
    matrices = {id(module.weight) for _, module in _matrices(model)}
    if quantised_tables:
        matrices |= {id(p) for _, p in _expert_tables(model)}
    rest = [Stored(name, p.numel(), bits) for name, p in model.named_parameters() if id(p) not in matrices]
    rest += [Stored(name, b.numel(), bits) for name, b in model.named_buffers() if not name.startswith("kv_caches.")]
    return rest


def _float(name: str, module: nn.Module, bits: int) -> Stored:
    return Stored(name, module.weight.numel(), bits)


# -- ExecuTorch ----------------------------------------------------------------------------------


def pte_tensors(model: CausalLM, spec: ExecuTorchSpec) -> list[Stored]:
    """The tensors of the .pte, as exporter/quant/executorch.py's plan quantises them."""
    scheme = spec.quantization
    stored = []
    for name, module in _matrices(model):  # the tied lm_head is its own tensor here: stored twice
        if scheme is None:
            stored.append(_float(name, module, 32))
            continue
        if name == EMBEDDING:
            choice = scheme.embedding
        elif name == LM_HEAD:
            choice = scheme.lm_head
        else:
            choice = scheme.scheme
        if choice == "fp32":
            stored.append(_float(name, module, 32))
            continue
        rows, columns = module.weight.shape
        # The embedding runs in weight-only kernels (its own group size); every linear in XNNPACK.
        group = getattr(scheme, "embedding_group_size", None) if name == EMBEDDING else scheme.group_size
        stored.append(_pte_codes(name, rows, columns, choice, group, dynamic_activations=name != EMBEDDING))
    if scheme is not None:  # expert rows [units, H], quantised by the dense quantiser's own builders
        hidden = model.config.hidden_size
        for name, table in _expert_tables(model):
            stored.append(_pte_codes(name, table.numel() // hidden, hidden, scheme.scheme, scheme.group_size, True))
    return stored + _rest(model, 32, quantised_tables=scheme is not None)


def _pte_codes(name: str, rows: int, columns: int, choice: str, group: int | None, dynamic_activations: bool) -> Stored:
    """A [rows, columns] weight as torchao codes: 4-bit in groups along columns, 8-bit one scale per row."""
    from cpm_mobile.exporter.quant.executorch import BITS, TERNARY_CODE_BITS, bf16_scales

    bits = TERNARY_CODE_BITS if choice == "ternary" else BITS[choice]
    group = group if bits == 4 else None
    scale_bytes = BF16 if bf16_scales(bits, dynamic_activations) else FP32
    return Stored(name, rows * columns, bits, rows * (columns // (group or columns)), scale_bytes)


# -- ONNX ----------------------------------------------------------------------------------------


def _matmul_nbits(name: str, rows: int, columns: int, bits: int, block: int, zero_points: str | None) -> Stored:
    """MatMulNBits' (or GatherBlockQuantized's) layout of a [rows, columns] weight blocked along columns:
    fp32 scales per block; zero points packed `bits` wide per row when asymmetric, fp32 for HQQ."""
    blocks = rows * math.ceil(columns / block)
    if zero_points == "packed":
        zero_bytes = rows * math.ceil(math.ceil(columns / block) * bits / 8)
    elif zero_points == "float":
        zero_bytes = blocks * FP32
    else:
        zero_bytes = 0
    return Stored(name, rows * block * math.ceil(columns / block), bits, blocks, FP32, zero_bytes)


def onnx_tensors(model: CausalLM, spec: OnnxSpec) -> list[Stored]:
    """The initializers of the .onnx, as exporter/quant/onnx.py's quantize_onnx writes them."""
    from cpm_mobile.exporter.quant.onnx import SCHEME_BITS

    float_bits = 8 * FLOAT_BYTES[spec.precision]
    scheme = spec.quantization
    symmetric = bool(getattr(scheme, "symmetric", False))
    table_zero_points = None if symmetric else "packed"  # embedding and lm_head are always rtn
    stored = []
    for name, module in _matrices(model):
        rows, columns = module.weight.shape  # [out, in] for a linear, [vocab, hidden] for the table
        if scheme is None:
            if not (name == LM_HEAD and model.tied):
                stored.append(_float(name, module, float_bits))
            continue
        if name == EMBEDDING:
            bits = scheme.embedding_bits
            if bits is None:
                stored.append(_float(name, module, float_bits))
            elif not (model.tied and bits == scheme.lm_head_bits):  # tied at the head's bits: its codes
                stored.append(_matmul_nbits(name, rows, columns, bits, scheme.block_size, table_zero_points))
        elif name == LM_HEAD:
            bits = scheme.lm_head_bits
            if bits is None:
                if not model.tied or scheme.embedding_bits is not None:
                    stored.append(_float(name, module, float_bits))  # a tied head reads the fp32 table
            else:
                stored.append(_matmul_nbits(name, rows, columns, bits, scheme.block_size, table_zero_points))
        else:
            bits = SCHEME_BITS[scheme.scheme]
            if scheme.scheme == "ternary":
                zero_points = None  # codes {1, 2, 3} around the default zero point 2
            elif getattr(scheme, "algorithm", "rtn") == "hqq":
                zero_points = "float"
            else:
                zero_points = None if symmetric else "packed"
            stored.append(_matmul_nbits(name, rows, columns, bits, scheme.block_size, zero_points))
    if scheme is not None:  # GatherBlockQuantized expert tables, blocked along H, the body's bits
        hidden = model.config.hidden_size
        for name, table in _expert_tables(model):
            stored.append(_matmul_nbits(name, table.numel() // hidden, hidden, SCHEME_BITS[scheme.scheme],
                                        scheme.block_size, None if symmetric else "packed"))
    return stored + _rest(model, float_bits, quantised_tables=scheme is not None)


# -- Core ML -------------------------------------------------------------------------------------


def coreml_weight_bytes(model: CausalLM, spec: CoreMLSpec) -> int:
    """weight.bin's payload: exporter/quant/coreml.py's formula for a compressed program, else every
    tensor (a tied table once) in the program's precision."""
    if spec.quantization is not None:
        from cpm_mobile.exporter.quant.coreml import expected_weight_bytes

        return expected_weight_bytes(model, spec.quantization, spec.precision)
    bits = 8 * FLOAT_BYTES[spec.precision]
    tensors = [_float(n, m, bits) for n, m in _matrices(model) if not (n == LM_HEAD and model.tied)]
    return sum(t.bytes for t in tensors + _rest(model, bits))


# -- per recipe ----------------------------------------------------------------------------------


def predict_bytes(model: CausalLM, spec: Any) -> int:
    """The artifact's size in bytes for one target spec of a recipe."""
    if isinstance(spec, ExecuTorchSpec):
        tensors = sum(t.bytes for t in pte_tensors(model, spec))
    elif isinstance(spec, OnnxSpec):
        tensors = sum(t.bytes for t in onnx_tensors(model, spec))
    elif isinstance(spec, CoreMLSpec):
        tensors = coreml_weight_bytes(model, spec)
    else:
        raise TypeError(f"no size rule for {type(spec).__name__}")
    fixed, per_layer = GRAPH_OVERHEAD_BYTES[spec.target]
    if spec.target == "onnx" and _expert_tables(model):
        tensors += ONNX_SPARSE_LAYER_BYTES * model.config.num_layers
    return tensors + fixed + per_layer * model.config.num_layers


def recipe_sizes(config: ModelConfig, tied: bool, recipes: Iterable[str] | None = None) -> list[ArtifactSize]:
    """One row per (recipe, target) of the recipes (default: the shipped ones) that run on this model;
    a recipe whose passes refuse the model (fp32-sparse on a dense FFN), or that needs a weight grid the
    checkpoint lacks, has no rows."""
    fp32 = load_recipe("fp32")
    baseline = {target: predict_bytes(shape_model(config, tied, fp32.max_seq_len), spec)
                for target, spec in fp32.targets.items()}
    rows = []
    for name in recipes or recipe_names():
        recipe = load_recipe(name)
        if recipe.weights == "checkpoint_grid" and config.weight_grid is None:
            continue
        model = shape_model(config, tied, recipe.max_seq_len)
        try:
            sizes = {target: predict_bytes(apply_passes(model, [*recipe.passes, *spec.passes], target), spec)
                     for target, spec in recipe.targets.items()}
        except InputError:
            continue
        rows += [ArtifactSize(recipe.name, target, size, size / baseline[target] if target in baseline else None)
                 for target, size in sizes.items()]
    return rows
