"""The onnxruntime contrib nodes both ONNX quantisers write (dense linears and the sparse expert tables):
which parameter a node carries, onnxruntime's block quantiser, GatherBlockQuantized."""
from __future__ import annotations

import ast
import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

WEIGHT_KEY = "cpm_mobile.weight"  # node metadata: the CausalLM parameter a quantised node carries
MS_DOMAIN = "com.microsoft"
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path of each node
WRAPPER_PREFIX = "model."  # PastPresentLM holds the CausalLM as .model


def module_path(node: onnx.NodeProto) -> str | None:
    for entry in node.metadata_props:
        if entry.key == NAME_SCOPES:
            scopes = ast.literal_eval(entry.value)
            # [..., 'model.layers.0.self_attn.q_proj', 'linear'] : the module is the last-but-one scope
            if len(scopes) >= 2 and scopes[-2].startswith(WRAPPER_PREFIX):
                return scopes[-2][len(WRAPPER_PREFIX):]
    return None


def matmul_nbits_module():
    """onnxruntime.quantization.matmul_nbits_quantizer, imported without its side effect: it calls
    logging.basicConfig(level=INFO) and logs every node, which would make the whole program chatty."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: PLC0415

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    matmul_nbits_quantizer.logger.setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def block_quantized_table(graph: onnx.GraphProto, prefix: str, table: np.ndarray, bits: int, block_size: int,
                          symmetric: bool, scale_dtype: Any) -> list[str]:
    """A [rows, columns] table -> onnxruntime's block codes along each row (its own quantiser: round to
    nearest), added as initializers; returns GatherBlockQuantized's data, scales (and zero points) inputs."""
    library = matmul_nbits_module()
    quantizer = library.DefaultWeightOnlyQuantizer(library.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, bits=bits))
    packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(table.astype(np.float32).T))
    names = [f"{prefix}_Q{bits}", f"{prefix}_scales"]
    graph.initializer.extend([numpy_helper.from_array(packed.reshape(len(table), -1), names[0]),
                              numpy_helper.from_array(scales.astype(scale_dtype), names[1])])
    if not symmetric:
        names.append(f"{prefix}_zero_points")
        graph.initializer.append(numpy_helper.from_array(zero_points, names[2]))
    return names


def gather_block_quantized(gather: onnx.NodeProto, tables: list[str], bits: int, block_size: int,
                           param: str) -> onnx.NodeProto:
    """Gather(table, ids) -> GatherBlockQuantized(data, ids, scales[, zero points]) in place, tagged with `param`."""
    new = helper.make_node("GatherBlockQuantized", [tables[0], gather.input[1], *tables[1:]], list(gather.output),
                           name=f"{gather.name}_Q{bits}", domain=MS_DOMAIN, bits=bits, block_size=block_size,
                           gather_axis=0, quantize_axis=1)
    new.metadata_props.add(key=WEIGHT_KEY, value=param)
    gather.CopyFrom(new)
    return new
