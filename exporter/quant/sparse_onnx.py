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

from exporter.errors import InputError

TABLES = ("up_experts", "down_experts")  # SparseBlockFFN's parameters
TABLE_BITS = {"int8": 8, "int4": 4}


def quantize_expert_tables(graph: onnx.GraphProto, scheme: Any) -> list[str]:
    """Replace every Gather of an expert table by GatherBlockQuantized; the parameters quantised."""
    from exporter.quant.onnx import MS_DOMAIN, WEIGHT_KEY, _matmul_nbits_module, _module_path

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[0] in initializers
               and node.input[0].rpartition(".")[2] in TABLES]
    if not gathers:
        return []
    if scheme.scheme not in TABLE_BITS:
        raise InputError("quantization.scheme", f"the sparse experts (pass blockffn_sparse) take int8 or int4 on ONNX, "
                                                f"not {scheme.scheme}")
    bits = TABLE_BITS[scheme.scheme]
    library = _matmul_nbits_module()
    quantizer = library.DefaultWeightOnlyQuantizer(library.DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=scheme.symmetric, bits=bits))
    params = []
    for gather in gathers:
        axis = next((helper.get_attribute_value(a) for a in gather.attribute if a.name == "axis"), 0)
        table = numpy_helper.to_array(initializers[gather.input[0]]).astype(np.float32)  # [E, de*H]
        if axis != 0 or table.ndim != 2:
            raise ValueError(f"{gather.name}: expected a row gather of a 2-D expert table")
        if table.shape[1] % scheme.block_size:
            raise InputError("quantization.block_size", f"{scheme.block_size} does not divide the expert rows "
                             f"({table.shape[1]}) of {gather.input[0]}")
        packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(table.T))
        rows = len(table)
        prefix = gather.input[0]
        data, scale_name = f"{prefix}_Q{bits}", f"{prefix}_scales"
        graph.initializer.extend([numpy_helper.from_array(packed.reshape(rows, -1), data),
                                  numpy_helper.from_array(scales.reshape(rows, -1).astype(np.float32), scale_name)])
        inputs = [data, gather.input[1], scale_name]
        if not scheme.symmetric:
            graph.initializer.append(numpy_helper.from_array(zero_points.reshape(rows, -1), f"{prefix}_zero_points"))
            inputs.append(f"{prefix}_zero_points")
        module = _module_path(gather)
        param = f"{module}.{prefix.rpartition('.')[2]}" if module else prefix.removeprefix("model.")
        new = helper.make_node("GatherBlockQuantized", inputs, list(gather.output), name=f"{gather.name}_Q{bits}",
                               domain=MS_DOMAIN, bits=bits, block_size=scheme.block_size, gather_axis=0,
                               quantize_axis=1)
        new.metadata_props.add(key=WEIGHT_KEY, value=param)
        gather.CopyFrom(new)
        params.append(param)
    return params
