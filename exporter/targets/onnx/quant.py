"""Quantise an exported ONNX graph with onnxruntime's tools, and build the twin of what it stores.

quantize_onnx rewrites the graph build_onnx gave (inputs and outputs keep their genai names):
  - every linear's MatMul -> MatMulNBits through onnxruntime's MatMulNBitsQuantizer (its block
    rounding, or its HQQ optimiser); ternary codes are ours (no onnxruntime tool rounds to ternary);
  - the lm_head (tied or not) -> MatMulNBits at `lm_head_bits`;
  - the embedding Gather -> GatherBlockQuantized at `embedding_bits`; when tied and at the lm_head's
    bits it gathers from the lm_head's own codes, so the file holds one copy.
Each quantised node carries the CausalLM parameter it replaces in its metadata (WEIGHT_KEY).

onnx_twin reads codes, scales and zero points back from those nodes and returns the eager variant
with exactly those dequantised weights. With accuracy_level 4 onnxruntime's CPU kernel also
quantises each activation row to int8 per block (scale = max |a| / 127, round half to even); the
twin does the same, so it reproduces the kernel to fp32 summation order.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.variant import derive, with_weights
from cpm_mobile.exporter.targets.onnx.nodes import (
    MS_DOMAIN, WEIGHT_KEY, block_quantized_table, gather_block_quantized, matmul_nbits_module, module_path,
)
from cpm_mobile.exporter.targets.onnx.spec import SCHEME_BITS

LM_HEAD, EMBEDDING = "lm_head.weight", "embed_tokens.weight"


@dataclass(frozen=True)
class WeightMatMul:
    node: str
    param: str
    weight: str  # initializer [K, N]
    k: int
    n: int


def int8_activations(bits: int, block_size: int, accuracy_level: int) -> bool:
    """Whether onnxruntime's CPU MatMulNBits quantises its input to int8 (measured on 1.32, and
    asserted by the tests: the 2-bit int8 kernels start at blocks of 32)."""
    return accuracy_level == 4 and (bits != 2 or block_size >= 32)


def quantize_onnx(onnx_model: ir.Model, scheme: Any, grid: Any = None) -> ir.Model:
    """The graph with its weights quantised per `scheme` (recipes.quant_onnx); the input is not changed.

    grid: the checkpoint's own integer grid (exporter/models/grid.py WeightGrid); its codes, scales and
    zero points become the body linears' MatMulNBits as they are, nothing rounded again."""
    proto = ir.serde.serialize_model(onnx_model)
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    if scheme.lm_head_bits is not None:
        _fold_transposed_head(graph, initializers)
    linears = _weight_matmuls(graph, initializers)
    embedding = _embedding_gather(graph, initializers)
    _check_blocks(linears, embedding, initializers, scheme)

    head = [linear for linear in linears if linear.param == LM_HEAD]
    body = [linear for linear in linears if linear.param != LM_HEAD]
    _with_ms_domain(proto)
    if grid is not None:
        on_grid = [linear for linear in body if linear.param in grid.linears]
        _grid_linears(graph, initializers, on_grid, grid, scheme)
        if len(on_grid) < len(body):  # weights the grid does not cover (none in GPTQ / QAT checkpoints)
            proto = _library_pass(proto, exclude=[linear.node for linear in head], bits=SCHEME_BITS[scheme.scheme],
                                  symmetric=_table_symmetric(scheme), scheme=scheme, algorithm="rtn")
    elif scheme.scheme == "ternary":
        _ternary(graph, initializers, body, scheme)
    else:
        proto = _library_pass(proto, exclude=[linear.node for linear in head], bits=SCHEME_BITS[scheme.scheme],
                              symmetric=scheme.symmetric, scheme=scheme, algorithm=getattr(scheme, "algorithm", "rtn"))
    if head and scheme.lm_head_bits is not None:
        proto = _library_pass(proto, exclude=[], bits=scheme.lm_head_bits, symmetric=_table_symmetric(scheme),
                              scheme=scheme, algorithm="rtn")
    _tag(proto.graph, {linear.node: linear.param for linear in linears})
    if embedding is not None and scheme.embedding_bits is not None:
        # the passes rebuilt the node list: find the Gather again
        gather = next(node for node in proto.graph.node if node.name == embedding.name)
        _quantize_embedding(proto.graph, gather, scheme)
    from cpm_mobile.exporter.targets.onnx.sparse import quantize_expert_tables

    quantize_expert_tables(proto.graph, scheme)  # the blockffn_sparse form's expert tables
    _drop_unused_initializers(proto.graph)
    return ir.serde.deserialize_model(proto)


def _with_ms_domain(proto: onnx.ModelProto) -> None:
    """Import onnxruntime's contrib-op domain (MatMulNBits, GatherBlockQuantized) once."""
    if not any(opset.domain == MS_DOMAIN for opset in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def quantize_embedding_onnx(onnx_model: ir.Model, scheme: Any) -> ir.Model:
    """A lone embedding graph (a vision-language model's embedding.onnx) with its Gather as GatherBlockQuantized
    at the scheme's embedding_bits, rounded as the text graph's own embedding is."""
    proto = ir.serde.serialize_model(onnx_model)
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    gather = _embedding_gather(proto.graph, initializers)
    if gather is None:
        raise ValueError("the embedding graph has no embed_tokens Gather")
    _with_ms_domain(proto)
    _quantize_embedding(proto.graph, gather, scheme)
    _drop_unused_initializers(proto.graph)
    return ir.serde.deserialize_model(proto)


@dataclass(frozen=True)
class _VisionScheme:
    """How the vision grid's linears are stored: MatMulNBits at the grid's width, no activation rounding."""

    scheme: str = "int8"
    accuracy_level: int = 0


def quantize_vision_onnx(onnx_model: ir.Model, grid: Any) -> ir.Model:
    """A vision encoder graph (exported inside a `.model` wrapper, so every MatMul names its linear) with each
    linear of `grid` (models/vision_grid.py) a MatMulNBits over the grid's codes and scales, fp32 activations
    (accuracy_level 0: the kernel dequantises, nothing else is rounded)."""
    proto = ir.serde.serialize_model(onnx_model)
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    linears = [linear for linear in _weight_matmuls(graph, initializers) if linear.param in grid.linears]
    missing = sorted(set(grid.linears) - {linear.param for linear in linears})
    if missing:
        raise ValueError(f"the vision graph has no MatMul for {', '.join(missing[:4])}")
    _with_ms_domain(proto)
    _grid_linears(graph, initializers, linears, grid, _VisionScheme())
    _drop_unused_initializers(graph)
    return ir.serde.deserialize_model(proto)


def onnx_twin(model: CausalLM, quantized_onnx: ir.Model | list[ir.Model], scheme: Any,
              activations: bool = True) -> CausalLM:
    """The eager variant of `model` computing what `quantized_onnx` stores; `model` is not changed.

    activations: also round each quantised linear's input as the accuracy_level 4 kernel does. That
    rounding is discontinuous, so fp32 summation-order differences flip some int8 codes and the
    twin matches the artifact statistically (KL ~1e-4 on the embedded models), not elementwise;
    with activations=False the twin matches `fp32_activations(graph)` to ~1e-5 (a tight check of
    every stored code, scale and zero point).
    Raises if a weight the scheme quantises is not stored quantised in the graph (a silently fp32
    tensor must not become its own reference). A list: the graphs that together hold the model (a
    vision-language model's model.onnx and embedding.onnx).
    """
    weights: dict[str, torch.Tensor] = {}
    act_blocks: dict[str, int] = {}
    graphs = quantized_onnx if isinstance(quantized_onnx, list) else [quantized_onnx]
    for node in (node for graph in graphs for node in graph.graph):
        if node.domain != MS_DOMAIN or node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        param = node.metadata_props.get(WEIGHT_KEY)
        if param is None:
            raise ValueError(f"{node.op_type} {node.name} does not say which weight it carries ({WEIGHT_KEY})")
        if node.op_type == "MatMulNBits":
            weights[param] = torch.from_numpy(_dequantize_matmul(node))
            attrs = _attributes(node)
            if activations and int8_activations(attrs["bits"], attrs["block_size"], attrs.get("accuracy_level", 0)):
                act_blocks[param.rpartition(".")[0]] = attrs["block_size"]
        else:
            weights[param] = torch.from_numpy(_dequantize_gather(node))
    _check_coverage(model, weights, scheme)
    if model.tied and EMBEDDING in weights and LM_HEAD in weights and torch.equal(weights[EMBEDDING], weights[LM_HEAD]):
        weights[EMBEDDING] = weights[LM_HEAD]  # one tensor: the twin stays tied like the graph
    twin = with_weights(model, weights)
    return derive(twin, lambda name, module: Int8ActivationLinear(module, act_blocks[name]) if name in act_blocks else None)


def fp32_activations(quantized_onnx: ir.Model) -> ir.Model:
    """A copy of the graph whose MatMulNBits keep their inputs fp32 (accuracy_level unset): the same
    stored weights through onnxruntime's exact dequantising kernel, for the tight weight check."""
    copy_ = ir.serde.deserialize_model(ir.serde.serialize_model(quantized_onnx))
    for node in copy_.graph:
        if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
            node.attributes.pop("accuracy_level", None)
    return copy_


class Int8ActivationLinear(nn.Module):
    """A linear whose input is rounded as MatMulNBits accuracy_level 4 rounds it: per row, per block
    of `block_size` inputs, to int8 with scale max |a| / 127 (MLAS multiplies by 1/scale)."""

    def __init__(self, linear: nn.Linear, block_size: int):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(*x.shape[:-1], -1, self.block_size)
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        rounded = (torch.round(blocks * inverse) * scale).reshape(x.shape)
        return F.linear(rounded, self.weight, self.bias)


# --- reading the exported graph -----------------------------------------------------------------

def _fold_transposed_head(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto]) -> None:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T as an initializer), for the weight (the lm_head,
    whose W the tied embedding also reads) so onnxruntime's quantiser sees a constant B."""
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type != "MatMul" or module_path(node) != "lm_head":
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        folded = numpy_helper.from_array(np.ascontiguousarray(weight.T), f"{transpose.input[0]}_transposed")
        graph.initializer.append(folded)
        initializers[folded.name] = folded
        node.input[1] = folded.name
        if not any(transpose.output[0] in other.input for other in graph.node):
            graph.node.remove(transpose)


def _weight_matmuls(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto]) -> list[WeightMatMul]:
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        module = module_path(node)
        dims = list(initializers[node.input[1]].dims)
        if module is None or len(dims) != 2:
            continue
        found.append(WeightMatMul(node.name, f"{module}.weight", node.input[1], dims[0], dims[1]))
    return found


def _embedding_gather(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto]) -> onnx.NodeProto | None:
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in initializers and module_path(node) == "embed_tokens":
            return node
    return None


def _check_blocks(linears: list[WeightMatMul], embedding: onnx.NodeProto | None,
                  initializers: dict[str, onnx.TensorProto], scheme: Any) -> None:
    if not linears:
        raise InputError("quantization", "the graph has no linear weights to quantise")
    widths = {linear.param: linear.k for linear in linears}
    if embedding is not None and scheme.embedding_bits is not None:
        widths[EMBEDDING] = int(initializers[embedding.input[0]].dims[1])
    for param, width in widths.items():
        if width % scheme.block_size:
            raise InputError("quantization.block_size", f"{scheme.block_size} does not divide the input width "
                             f"{width} of {param}; pick a block size that divides every layer's input width")


def check_blocks_fit(model: CausalLM, scheme: Any) -> None:
    """The block size divides every input width it splits (from the module's shapes: the pre-flight
    of what _check_blocks finds in the graph). A checkpoint grid's linears keep their own groups."""
    grid = model.config.weight_grid
    widths = {}
    for name, module in model.named_modules():
        param = f"{name}.weight"
        if isinstance(module, nn.Linear) and param != LM_HEAD and (grid is None or param not in grid.linears):
            widths[param] = module.in_features
    if scheme.lm_head_bits is not None:
        widths[LM_HEAD] = model.config.hidden_size
    if scheme.embedding_bits is not None:
        widths[EMBEDDING] = model.config.hidden_size
    for param, width in widths.items():
        if width % scheme.block_size:
            raise InputError("quantization.block_size", f"{scheme.block_size} does not divide the input width "
                             f"{width} of {param}; pick a block size that divides every layer's input width")


def _table_symmetric(scheme: Any) -> bool:
    return bool(getattr(scheme, "symmetric", False))


# --- quantising ----------------------------------------------------------------------------------




def _library_pass(proto: onnx.ModelProto, exclude: list[str], bits: int, symmetric: bool, scheme: Any,
                  algorithm: str) -> onnx.ModelProto:
    """One MatMulNBitsQuantizer pass over the MatMuls with constant weights, except `exclude`."""
    library = matmul_nbits_module()
    accuracy = scheme.accuracy_level or None
    if algorithm == "hqq":
        config = library.HQQWeightOnlyQuantConfig(block_size=scheme.block_size, bits=bits, op_types_to_quantize=("MatMul",))
    else:
        config = library.DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=symmetric,
                                                      accuracy_level=accuracy, bits=bits, op_types_to_quantize=("MatMul",))
    quantizer = library.MatMulNBitsQuantizer(proto, nodes_to_exclude=exclude, algo_config=config)
    with warnings.catch_warnings():
        # HQQ wraps read-only numpy weights in torch tensors it never writes; torch warns about it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        quantizer.process()
    result = quantizer.model.model
    if algorithm == "hqq" and accuracy:
        # HQQ's nodes leave accuracy_level unset; the kernel choice is the scheme's.
        for node in result.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(helper.make_attribute("accuracy_level", accuracy))
    return result


def _tag(graph: onnx.GraphProto, params_by_node: dict[str, str]) -> None:
    """Name on every MatMulNBits the parameter it carries (onnxruntime names it <node>_Q<bits>)."""
    for node in graph.node:
        if node.op_type == "MatMulNBits" and not _metadata(node, WEIGHT_KEY):
            original = re.sub(r"_Q\d$", "", node.name)
            if original in params_by_node:
                node.metadata_props.add(key=WEIGHT_KEY, value=params_by_node[original])


def _swap_in_matmul_nbits(graph: onnx.GraphProto, linears: list[WeightMatMul], scheme: Any,
                          stored_form: Callable[[WeightMatMul], tuple[int, int, dict[str, np.ndarray]]]) -> None:
    """Each linear's MatMul -> a MatMulNBits over the tensors `stored_form(linear)` gives: (bits, block size,
    {"Q<bits>": codes, "scales": ..., optionally "zero_points": ...}), added as `<weight>_<role>` initializers."""
    by_name = {linear.node: linear for linear in linears}
    replaced = []
    for index, node in enumerate(graph.node):
        linear = by_name.get(node.name)
        if linear is None:
            continue
        bits, block_size, tensors = stored_form(linear)
        names = [f"{linear.weight}_{role}" for role in tensors]
        graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in zip(names, tensors.values()))
        attrs = dict(K=linear.k, N=linear.n, bits=bits, block_size=block_size)
        if scheme.accuracy_level:
            attrs["accuracy_level"] = scheme.accuracy_level
        new = helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                               name=f"{node.name}_Q{bits}", domain=MS_DOMAIN, **attrs)
        new.metadata_props.add(key=WEIGHT_KEY, value=linear.param)
        replaced.append((index, new))
    for index, new in replaced:
        graph.node[index].CopyFrom(new)


def _ternary(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto], linears: list[WeightMatMul],
             scheme: Any) -> None:
    """BitCPM / BitNet b1.58 rounding per block: scale = mean |W|, code = clip(round(W / scale), -1, 1),
    stored as 2-bit MatMulNBits codes code + 2 with the default zero point 2. Written here because no
    onnxruntime quantiser rounds to ternary."""
    def stored_form(linear: WeightMatMul):
        stored = numpy_helper.to_array(initializers[linear.weight])
        packed, scales = ternary_codes(stored.T.astype(np.float32), scheme.block_size)  # weight [N, K]
        # MatMulNBits takes scales in the activations' dtype
        return 2, scheme.block_size, {"Q2": packed, "scales": scales.astype(stored.dtype)}

    _swap_in_matmul_nbits(graph, linears, scheme, stored_form)


def check_grid(model: CausalLM, scheme: Any, precision: str = "fp32") -> None:
    """Refuse, before any work, a checkpoint grid MatMulNBits cannot carry losslessly, or a scheme
    that contradicts it (one-line InputError naming the target and why)."""
    from cpm_mobile.exporter.targets import grid
    from cpm_mobile.exporter.targets.onnx.spec import CAPABILITIES

    grid.check_grid(model, scheme, CAPABILITIES.grid, "onnx", precision)


def _grid_linears(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto], linears: list[WeightMatMul],
                  grid: Any, scheme: Any) -> None:
    """Every body linear -> MatMulNBits holding the checkpoint grid's own codes (shifted to the
    scheme's bit width when wider: the differences code - zero are kept), scales and zero points. A mixed
    grid's 8-bit linears become 8-bit MatMulNBits."""
    def stored_form(linear: WeightMatMul):
        entry = grid.linears[linear.param]
        bits = max(SCHEME_BITS[scheme.scheme], entry.bits)
        shift = (1 << (bits - 1)) - (1 << (entry.bits - 1))
        blocks = linear.k // entry.group_size
        codes = (entry.codes.numpy().astype(np.int32) + shift).reshape(linear.n, blocks, entry.group_size)  # [N, K]
        dtype = numpy_helper.to_array(initializers[linear.weight]).dtype
        tensors = {f"Q{bits}": pack_codes(codes, bits), "scales": entry.scales.numpy().astype(dtype)}
        if not entry.symmetric:  # zero points per row, padded to whole bytes
            per_byte = 8 // bits
            padded = np.zeros((linear.n, -(-blocks // per_byte) * per_byte), np.int32)
            padded[:, :blocks] = entry.zeros.numpy().astype(np.int32) + shift
            tensors["zero_points"] = pack_codes(padded, bits)
        return bits, entry.group_size, tensors

    _swap_in_matmul_nbits(graph, linears, scheme, stored_form)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes along the last axis -> uint8, 8 / bits per byte, the first in the lowest bits (MatMulNBits'
    and GatherBlockQuantized's order)."""
    per_byte = 8 // bits
    packed = np.zeros((*codes.shape[:-1], codes.shape[-1] // per_byte), np.uint8)
    for j in range(per_byte):
        packed |= (codes[..., j::per_byte] << (bits * j)).astype(np.uint8)
    return packed


def ternary_codes(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] -> (packed uint8 [N, K / block_size, block_size / 4], scales [N, K / block_size])."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // block_size, block_size)
    scales = np.abs(blocks).mean(-1).astype(np.float32)
    safe = np.where(scales > 0, scales, 1)[..., None]
    codes = (np.clip(np.rint(blocks / safe), -1, 1) + 2).astype(np.uint8)  # {1, 2, 3}
    return pack_codes(codes, 2), scales


def _quantize_embedding(graph: onnx.GraphProto, gather: onnx.NodeProto, scheme: Any) -> None:
    """Gather(E, ids) -> GatherBlockQuantized over codes in MatMulNBits' layout: the lm_head's own
    when tied at the same bits (through a Reshape to [V, H * bits / 8]), else E's, rounded by
    onnxruntime's block quantiser."""
    bits = scheme.embedding_bits
    head = _tied_head(graph, gather) if bits == scheme.lm_head_bits else None
    prefix = gather.input[0]
    reshape = None
    if head is not None:
        b_name = head.input[1]
        vocab = _attribute(head, "N")
        shape = numpy_helper.from_array(np.array([vocab, -1], np.int64), f"{prefix}_rows")
        graph.initializer.append(shape)
        reshape = helper.make_node("Reshape", [b_name, shape.name], [f"{b_name}_rows"], name=f"{gather.name}_rows")
        tables = [f"{b_name}_rows", *(name for name in head.input[2:4] if name)]  # its scales (and zero points)
    else:
        stored = numpy_helper.to_array(_initializer(graph, gather.input[0]))  # [V, H]
        tables = block_quantized_table(graph, prefix, stored, bits, scheme.block_size, _table_symmetric(scheme),
                                       stored.dtype)
    new = gather_block_quantized(gather, tables, bits, scheme.block_size, EMBEDDING)
    if reshape is not None:
        _insert_before(graph, new.name, reshape)


def _tied_head(graph: onnx.GraphProto, gather: onnx.NodeProto) -> onnx.NodeProto | None:
    """The lm_head MatMulNBits whose codes were made from the embedding's own table."""
    for node in graph.node:
        if node.op_type == "MatMulNBits" and _metadata(node, WEIGHT_KEY) == LM_HEAD:
            # onnxruntime names the codes <weight>_Q<bits>; the folded weight is <table>_transposed
            if node.input[1].startswith(f"{gather.input[0]}_transposed"):
                return node
    return None


# --- reading the quantised graph -----------------------------------------------------------------

def _attributes(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape":  # the tied embedding's view of the head's codes
        data, shape = _constant(producer.inputs[0]), _constant(producer.inputs[1])
        return data.reshape(shape)
    raise ValueError(f"{value.name} is not a constant")


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., B] holding 8 / bits codes per byte (the first in the lowest bits) -> [..., B * 8 / bits]."""
    per_byte = 8 // bits
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * per_byte), np.int32)
    for j in range(per_byte):
        codes[..., j::per_byte] = (packed >> (bits * j)) & ((1 << bits) - 1)
    return codes


def _dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                block_size: int) -> np.ndarray:
    """codes [R, C] in blocks of block_size along C; scales / zero_points [R, C / block_size]."""
    rows, cols = codes.shape
    blocks = cols // block_size
    scales = scales.reshape(rows, blocks).astype(np.float32)
    if zero_points is None:
        zero = np.full((rows, blocks), 1 << (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        zero = unpack(zero_points.reshape(rows, -1), bits)[:, :blocks].astype(np.float32)
    else:  # HQQ's float zero points
        zero = zero_points.reshape(rows, blocks).astype(np.float32)
    grouped = codes.reshape(rows, blocks, block_size).astype(np.float32)
    return ((grouped - zero[..., None]) * scales[..., None]).reshape(rows, cols)


def _dequantize_matmul(node: ir.Node) -> np.ndarray:
    """MatMulNBits -> the [N, K] weight (nn.Linear's layout) it multiplies by."""
    attrs = _attributes(node)
    bits, block_size, n, k = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
    packed = _constant(node.inputs[1]).reshape(n, -1)
    zero = _constant(node.inputs[3]) if len(node.inputs) > 3 else None
    return _dequantize(unpack(packed, bits)[:, :k], _constant(node.inputs[2]), zero, bits, block_size)


def _dequantize_gather(node: ir.Node) -> np.ndarray:
    attrs = _attributes(node)
    if attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis") not in (1, -1):
        raise ValueError(f"{node.name}: only row gathers quantised along rows are read")
    bits = attrs.get("bits", 4)
    data = _constant(node.inputs[0])
    zero = _constant(node.inputs[3]) if len(node.inputs) > 3 else None
    return _dequantize(unpack(data, bits), _constant(node.inputs[2]), zero, bits, attrs["block_size"])


def _check_coverage(model: CausalLM, weights: dict[str, torch.Tensor], scheme: Any) -> None:
    expected = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if scheme.lm_head_bits is None:
        expected.discard(LM_HEAD)
    if scheme.embedding_bits is not None:
        expected.add(EMBEDDING)
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(f"the graph does not store these weights quantised: {', '.join(missing[:4])}"
                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))


# --- small proto helpers -------------------------------------------------------------------------

def _metadata(node: onnx.NodeProto, key: str) -> str | None:
    return next((entry.value for entry in node.metadata_props if entry.key == key), None)


def _attribute(node: onnx.NodeProto, name: str) -> Any:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto:
    return next(tensor for tensor in graph.initializer if tensor.name == name)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    keep = [tensor for tensor in graph.initializer if tensor.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _insert_before(graph: onnx.GraphProto, anchor: str, node: onnx.NodeProto) -> None:
    nodes = [onnx.NodeProto() for _ in graph.node]
    for copy_, original in zip(nodes, graph.node):
        copy_.CopyFrom(original)
    index = next(i for i, original in enumerate(nodes) if original.name == anchor)
    del graph.node[:]
    graph.node.extend([*nodes[:index], node, *nodes[index:]])
