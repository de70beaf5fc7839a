"""The .onnx's size predicted from the shapes: initializers as exporter/targets/onnx/quant.py's quantize_onnx writes them.

MatMulNBits per linear (fp32 scales per block, packed zero points when asymmetric, fp32 ones for HQQ),
lm_head at lm_head_bits; GatherBlockQuantized for the embedding, which reads the lm_head's own codes when
tied at the same bits (one table in the file). An unquantised tied table is one initializer. The graph
itself, ~1 KB of exporter metadata per node, is fitted to exports of minicpm-tiny's shape at 1, 2 and 8
layers (95 KB a layer fp32, 86 KB int4, 29 KB fixed).
"""
from __future__ import annotations

import math

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.onnx.spec import SCHEME_BITS, OnnxSpec
from cpm_mobile.exporter.targets.stored import (
    EMBEDDING, FLOAT_BYTES, FP32, LM_HEAD, Stored, expert_tables, float_tensor, grid_width, matrices, rest,
)

GRAPH_BYTES, GRAPH_BYTES_PER_LAYER = 29_000, 90_000
# The sparse pass's gather form adds nodes (NonZero, Gather, the union of active experts): measured
# 52 KB (blockffn-tiny int4-sparse) to 82 KB (a 2-layer MLA fp32-sparse) more graph per sparse layer.
SPARSE_LAYER_BYTES = 65_000


def stored_bytes(model: CausalLM, spec: OnnxSpec) -> int:
    tensors = sum(t.bytes for t in onnx_tensors(model, spec))
    layers = model.config.num_layers
    if expert_tables(model):
        tensors += SPARSE_LAYER_BYTES * layers
    return tensors + GRAPH_BYTES + GRAPH_BYTES_PER_LAYER * layers


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
    """The initializers of the .onnx, as exporter/targets/onnx/quant.py's quantize_onnx writes them."""
    float_bits = 8 * FLOAT_BYTES[spec.precision]
    scheme = spec.quantization
    symmetric = bool(getattr(scheme, "symmetric", False))
    table_zero_points = None if symmetric else "packed"  # embedding and lm_head are always rtn
    stored = []
    for name, module in matrices(model):
        rows, columns = module.weight.shape  # [out, in] for a linear, [vocab, hidden] for the table
        if scheme is None:
            if not (name == LM_HEAD and model.tied):
                stored.append(float_tensor(name, module, float_bits))
            continue
        if name == EMBEDDING:
            bits = scheme.embedding_bits
            if bits is None:
                stored.append(float_tensor(name, module, float_bits))
            elif not (model.tied and bits == scheme.lm_head_bits):  # tied at the head's bits: its codes
                stored.append(_matmul_nbits(name, rows, columns, bits, scheme.block_size, table_zero_points))
        elif name == LM_HEAD:
            bits = scheme.lm_head_bits
            if bits is None:
                if not model.tied or scheme.embedding_bits is not None:
                    stored.append(float_tensor(name, module, float_bits))  # a tied head reads the fp32 table
            else:
                stored.append(_matmul_nbits(name, rows, columns, bits, scheme.block_size, table_zero_points))
        else:
            bits = max(SCHEME_BITS[scheme.scheme], grid_width(model, name) or 0)  # a mixed grid's 8-bit linears
            if scheme.scheme == "ternary":
                zero_points = None  # codes {1, 2, 3} around the default zero point 2
            elif getattr(scheme, "algorithm", "rtn") == "hqq":
                zero_points = "float"
            else:
                zero_points = None if symmetric else "packed"
            stored.append(_matmul_nbits(name, rows, columns, bits, scheme.block_size, zero_points))
    if scheme is not None:  # GatherBlockQuantized expert tables, blocked along H, the body's bits
        hidden = model.config.hidden_size
        for name, table in expert_tables(model):
            stored.append(_matmul_nbits(name, table.numel() // hidden, hidden, SCHEME_BITS[scheme.scheme],
                                        scheme.block_size, None if symmetric else "packed"))
    return stored + rest(model, float_bits, quantised_tables=scheme is not None)
