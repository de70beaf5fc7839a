"""The ONNX quantisation of the sparse gather form: the experts' weight tables as GatherBlockQuantized.

SparseBlockFFN (exporter/passes/blockffn_sparse.py) gathers the active experts' rows from two
tables, up_experts and down_experts [E, de*H] (row e: expert e's [de, H] up rows / down rows).
Each table's Gather becomes onnxruntime's GatherBlockQuantized, which fetches only the active
rows, dequantised to fp32, for the same MatMuls: the codes are rounded by onnxruntime's own block
quantiser (the one MatMulNBits uses) in blocks of `block_size` along each table row, so along H
within one unit's row. For the up table that is exactly the dense up projection's MatMulNBits
blocks (the same codes, scales and zero points); the down table's blocks run along H too, while a
dense MatMulNBits down projection blocks along its input, the E*de units: GatherBlockQuantized
quantises along the gathered rows, and units blocks would straddle experts whenever de is not a
multiple of the block (blockffn-tiny: de = 18). HQQ's float zero points do not fit
GatherBlockQuantized's packed ones, so the tables take round-to-nearest (as the embedding does).
Each node names the parameter it carries (onnx.WEIGHT_KEY), so onnx_twin reads the dequantised
tables back like any other quantised weight.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.targets.onnx.nodes import block_quantized_table, gather_block_quantized, module_path

TABLES = ("up_experts", "down_experts")  # SparseBlockFFN's parameters
TABLE_BITS = {"int8": 8, "int4": 4}


def quantize_expert_tables(graph: onnx.GraphProto, scheme: Any) -> list[str]:
    """Replace every Gather of an expert table by GatherBlockQuantized; the parameters quantised."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[0] in initializers
               and node.input[0].rpartition(".")[2] in TABLES]
    if not gathers:
        return []
    if scheme.scheme not in TABLE_BITS:
        raise InputError("quantization.scheme", f"the sparse experts (pass blockffn_sparse) take int8 or int4 on ONNX, "
                                                f"not {scheme.scheme}")
    bits = TABLE_BITS[scheme.scheme]
    params = []
    for gather in gathers:
        axis = next((helper.get_attribute_value(a) for a in gather.attribute if a.name == "axis"), 0)
        table = numpy_helper.to_array(initializers[gather.input[0]])  # [E, de*H]
        if axis != 0 or table.ndim != 2:
            raise ValueError(f"{gather.name}: expected a row gather of a 2-D expert table")
        if table.shape[1] % scheme.block_size:
            raise InputError("quantization.block_size", f"{scheme.block_size} does not divide the expert rows "
                             f"({table.shape[1]}) of {gather.input[0]}")
        prefix = gather.input[0]
        tables = block_quantized_table(graph, prefix, table, bits, scheme.block_size, scheme.symmetric, np.float32)
        module = module_path(gather)
        param = f"{module}.{prefix.rpartition('.')[2]}" if module else prefix.removeprefix("model.")
        gather_block_quantized(gather, tables, bits, scheme.block_size, param)
        params.append(param)
    return params
