"""Numpy implementations of Core ML ML Program (MIL) ops.

Each op is a function ``fn(call: OpCall) -> np.ndarray | tuple[np.ndarray, ...]`` registered in
``OPS`` under its MIL op type. Semantics follow the op definitions in
``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18`` (docstrings), written independently of
coremltools' own ``value_inference`` so that the interpreter is a second opinion, not a copy.

Numerics model (shared with ``mil_interpreter``): floating-point operands arrive as float32
(fp16 values are upcast exactly), every op computes in float32, and the interpreter rounds each
op output to its declared dtype. For fp16 programs this means fp16 storage between ops with fp32
accumulation inside ops (matmul, linear, reductions, softmax). Real Core ML backends may
accumulate in fp16, so fp16 results must be compared with a tolerance.

Ops the interpreter cannot run faithfully are absent from ``OPS`` (or raise
``UnsupportedOpError`` for unsupported variants); nothing is ever skipped.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

ArrayOut = np.ndarray | tuple[np.ndarray, ...]


class UnsupportedOpError(RuntimeError):
    """The interpreter has no faithful numpy implementation for an op (or op variant)."""

    def __init__(self, op_type: str, op_name: str, detail: str = ""):
        self.op_type = op_type
        self.op_name = op_name
        msg = f"unsupported MIL op type '{op_type}' (op '{op_name}')"
        super().__init__(f"{msg}: {detail}" if detail else msg)


@dataclass(frozen=True)
class StateRef:
    """Binding of a ``state<...>`` function input: names the entry of the state dict."""

    name: str


@dataclass
class OpCall:
    """One op invocation: the MIL op, its bound input values and the live state dict."""

    op: Any  # coremltools.converters.mil.mil.Operation
    args: dict[str, Any]
    states: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> Any:
        if name not in self.args:
            raise KeyError(f"{self.op.op_type} '{self.op.name}': missing input '{name}'")
        return self.args[name]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.args.get(name)
        return default if value is None else value

    def unsupported(self, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.op.op_type, self.op.name, detail)

    @property
    def opset(self) -> int:
        """iOS opset (15..18) of the op class that defines this op's variant."""
        return opset_of(self.op)


OpFn = Callable[[OpCall], ArrayOut]
OPS: dict[str, OpFn] = {}

# Ops whose numpy is delegated to coremltools' materialized_val_inference (load-time only).
DELEGATED_OPS: set[str] = set()


def register(*op_types: str) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        for op_type in op_types:
            OPS[op_type] = fn
        return fn

    return deco


def opset_of(op: Any) -> int:
    match = re.search(r"\.iOS(\d+)\.", type(op).__module__ + ".")
    if match:
        return int(match.group(1))
    return 18  # coreml_dialect ops (coreml_update_state) come with iOS18 states


# ---------------------------------------------------------------------------------------------
# small helpers


def _int(value: Any) -> int:
    """Python int from a 0-d or 1-element array (numpy 2 refuses int() on 1-element arrays)."""
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"expected a single integer, got {flat.size} values")
    return int(flat[0])


def _ints(value: Any) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _bools(value: Any, rank: int, default: bool = False) -> list[bool]:
    if value is None:
        return [default] * rank
    return [bool(v) for v in np.asarray(value).reshape(-1)]


def _axis(axis: Any, rank: int) -> int:
    a = _int(axis)
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"axis {a} out of range for rank {rank}")
    return a % max(rank, 1)


def _axes(axes: Any, rank: int) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(sorted(_axis(a, rank) for a in _ints(axes)))


def _float(x: np.ndarray) -> np.ndarray:
    """The operand as float32 (ints/bools promoted) for transcendental math."""
    x = np.asarray(x)
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _check_indices(idx: np.ndarray, size: int, allow_negative: bool, what: str) -> np.ndarray:
    """Validate gather/scatter indices; iOS17+ treats negative indices as out of bounds."""
    idx = np.asarray(idx).astype(np.int64)
    if allow_negative:
        idx = np.where(idx < 0, idx + size, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        bad = idx[(idx < 0) | (idx >= size)].reshape(-1)[0]
        raise IndexError(f"{what}: index {bad} out of bounds for dimension of size {size}")
    return idx


def _channel_param(param: np.ndarray, rank: int, channel_axis: int) -> np.ndarray:
    """Reshape a per-channel vector [C] so it broadcasts along ``channel_axis``."""
    shape = [1] * rank
    shape[channel_axis] = -1
    return np.asarray(param).reshape(shape)


# ---------------------------------------------------------------------------------------------
# const / compile-time ops


@register("const")
def const(call: OpCall) -> ArrayOut:
    return np.asarray(call.op.outputs[0].val)


@register("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(call: OpCall) -> ArrayOut:
    """output = scale * (data - offset), scale/offset repeated over blocks of data."""
    data = _float(call["data"])
    scale = _float(call["scale"])
    offset = call.get("offset")
    out = data - _expand_blocks(_float(offset), data.shape) if offset is not None else data
    return out * _expand_blocks(scale, data.shape)


def _expand_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if param.ndim != len(shape):
        raise ValueError(f"block parameter rank {param.ndim} != data rank {len(shape)}")
    for axis, (dim, groups) in enumerate(zip(shape, param.shape)):
        if dim % groups:
            raise ValueError(f"dim {dim} not divisible into {groups} blocks")
        param = np.repeat(param, dim // groups, axis=axis)
    return param


@register("constexpr_lut_to_dense")
def constexpr_lut_to_dense(call: OpCall) -> ArrayOut:
    if "shape" in call.args:  # iOS16 variant: bit-packed uint8 indices + flat lut
        return _delegate(call)
    return _lut_to_dense_ios18(call["indices"], call["lut"], call.get("vector_axis"))


def _lut_to_dense_ios18(indices: np.ndarray, lut: np.ndarray, vector_axis: Any) -> np.ndarray:
    """indices [*D], lut [*G, P, V] with D[i] % G[i] == 0: per-block palettes of V-vectors."""
    indices = np.asarray(indices).astype(np.int64)
    lut = np.asarray(lut)
    rank = indices.ndim
    if lut.ndim != rank + 2:
        raise ValueError(f"lut rank {lut.ndim} != indices rank {rank} + 2")
    grids = np.ix_(*[np.arange(d) // (d // g) for d, g in zip(indices.shape, lut.shape[:rank])])
    picked = lut[(*grids, indices)]  # [*D, V]
    vector_size = lut.shape[-1]
    if vector_size == 1:
        return picked[..., 0]
    axis = _axis(vector_axis, rank)
    moved = np.moveaxis(picked, -1, axis + 1)
    shape = list(indices.shape)
    shape[axis] *= vector_size
    return moved.reshape(shape)


@register("constexpr_affine_dequantize")
def constexpr_affine_dequantize(call: OpCall) -> ArrayOut:
    data = _float(call["quantized_data"])
    axis = _axis(call["axis"], data.ndim)
    zero_point = _float(call["zero_point"])
    scale = _float(call["scale"])
    if zero_point.ndim:
        zero_point = _channel_param(zero_point, data.ndim, axis)
    if scale.ndim:
        scale = _channel_param(scale, data.ndim, axis)
    return (data - zero_point) * scale


@register("constexpr_cast")
def constexpr_cast(call: OpCall) -> ArrayOut:
    return np.asarray(call["source_val"]).astype(_CAST_DTYPES[str(call["output_dtype"])])


def _delegate(call: OpCall) -> ArrayOut:
    """Decompression formats whose bit-level layout we do not re-implement (load time only)."""
    return call.op.materialized_val_inference()


for _name in ("constexpr_sparse_to_dense", "constexpr_lut_to_sparse",
              "constexpr_sparse_blockwise_shift_scale"):
    OPS[_name] = _delegate
    DELEGATED_OPS.add(_name)
DELEGATED_OPS.add("constexpr_lut_to_dense")  # iOS16 variant only


# ---------------------------------------------------------------------------------------------
# states


@register("read_state")
def read_state(call: OpCall) -> ArrayOut:
    ref: StateRef = call["input"]
    return call.states[ref.name].copy()  # a snapshot: later state writes must not alias it


@register("coreml_update_state")
def coreml_update_state(call: OpCall) -> ArrayOut:
    ref: StateRef = call["state"]
    value = np.asarray(call["value"])
    target = call.states[ref.name]
    if value.shape != target.shape:
        raise ValueError(f"state '{ref.name}' has shape {target.shape}, update has {value.shape}")
    target[...] = value  # rounds to the state dtype (fp16), as Core ML stores it
    return value


# ---------------------------------------------------------------------------------------------
# elementwise


def _binary(ufunc: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> OpFn:
    def run(call: OpCall) -> ArrayOut:
        return ufunc(np.asarray(call["x"]), np.asarray(call["y"]))

    return run


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.true_divide,
    "floor_div": np.floor_divide,
    "mod": np.mod,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}
for _name, _ufunc in _BINARY.items():
    OPS[_name] = _binary(_ufunc)


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy ships with the toolchain here
        return np.vectorize(math.erf, otypes=[np.float64])(x).astype(np.float32)
    return erf(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "abs": np.abs,
    "acos": np.arccos,
    "asin": np.arcsin,
    "atan": np.arctan,
    "atanh": np.arctanh,
    "ceil": np.ceil,
    "cos": np.cos,
    "cosh": np.cosh,
    "erf": _erf,
    "exp": np.exp,
    "exp2": np.exp2,
    "floor": np.floor,
    "round": np.round,  # half to even: MIL doc says 0.5 rounds to 0
    "sign": np.sign,
    "sin": np.sin,
    "sinh": np.sinh,
    "sqrt": np.sqrt,
    "square": np.square,
    "tan": np.tan,
    "tanh": np.tanh,
    "logical_not": np.logical_not,
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.logaddexp(0, x),
    "softsign": lambda x: x / (1 + np.abs(x)),
}


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> OpFn:
    def run(call: OpCall) -> ArrayOut:
        return fn(np.asarray(call["x"]))

    return run


for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn)


@register("inverse")
def inverse(call: OpCall) -> ArrayOut:
    return 1.0 / (_float(call["x"]) + call.get("epsilon", 1e-4))


@register("log")
def log(call: OpCall) -> ArrayOut:
    return np.log(_float(call["x"]) + call.get("epsilon", 1e-45))


@register("rsqrt")
def rsqrt(call: OpCall) -> ArrayOut:
    return 1.0 / np.sqrt(_float(call["x"]) + call.get("epsilon", 1e-12))


@register("clip")
def clip(call: OpCall) -> ArrayOut:
    return np.minimum(np.maximum(call["x"], call["alpha"]), call["beta"])


@register("threshold")
def threshold(call: OpCall) -> ArrayOut:
    return np.maximum(call["x"], call["alpha"])


_CAST_DTYPES: dict[str, type] = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "int64": np.int64, "bool": np.bool_,
}


@register("cast")
def cast(call: OpCall) -> ArrayOut:
    """Float -> int truncates toward zero and out-of-range ints wrap (numpy astype)."""
    dtype = str(call["dtype"])
    if dtype not in _CAST_DTYPES:
        raise call.unsupported(f"cast to dtype '{dtype}'")
    return np.asarray(call["x"]).astype(_CAST_DTYPES[dtype])


# ---------------------------------------------------------------------------------------------
# activations


@register("gelu")
def gelu(call: OpCall) -> ArrayOut:
    x = _float(call["x"])
    mode = str(call.get("mode", "EXACT"))
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x**3)
        return 0.5 * x * (1.0 + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    raise call.unsupported(f"gelu mode '{mode}'")


@register("softmax")
def softmax(call: OpCall) -> ArrayOut:
    x = _float(call["x"])
    axis = _axis(call.get("axis", -1), x.ndim)
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


@register("leaky_relu")
def leaky_relu(call: OpCall) -> ArrayOut:
    x = call["x"]
    return np.where(x >= 0, x, call.get("alpha", 0.01) * x)


@register("elu")
def elu(call: OpCall) -> ArrayOut:
    x = call["x"]
    return np.where(x > 0, x, call.get("alpha", 1.0) * np.expm1(np.minimum(x, 0)))


@register("clamped_relu")
def clamped_relu(call: OpCall) -> ArrayOut:
    x = call["x"]
    return np.minimum(np.where(x >= 0, x, call["alpha"] * x), call["beta"])


@register("sigmoid_hard")
def sigmoid_hard(call: OpCall) -> ArrayOut:
    x = call["x"]
    return np.clip(call.get("alpha", 0.2) * x + call.get("beta", 0.5), 0.0, 1.0)


@register("scaled_tanh")
def scaled_tanh(call: OpCall) -> ArrayOut:
    return call.get("alpha", 1.0) * np.tanh(call.get("beta", 1.0) * call["x"])


@register("linear_activation")
def linear_activation(call: OpCall) -> ArrayOut:
    return call["alpha"] * call["x"] + call.get("beta", 0.0)


@register("thresholded_relu")
def thresholded_relu(call: OpCall) -> ArrayOut:
    x = call["x"]
    return np.where(x >= call.get("alpha", 1.0), x, 0.0)


# ---------------------------------------------------------------------------------------------
# linear algebra


@register("linear")
def linear(call: OpCall) -> ArrayOut:
    """x @ weight.T + bias, weight [D_out, D_in]. fp16 operands are computed in fp32."""
    out = np.matmul(call["x"], np.asarray(call["weight"]).T)
    bias = call.get("bias")
    return out if bias is None else out + bias


@register("conv")
def conv(call: OpCall) -> ArrayOut:
    """2-D convolution, NCHW, weight [C_out, C_in/groups, kH, kW]: windows gathered, then one tensordot
    (fp32). pad_type valid / custom / same; groups 1 and dilation 1 only (what the exported models use)."""
    x, weight = np.asarray(call["x"]), np.asarray(call["weight"])
    if x.ndim != 4:
        raise call.unsupported(f"conv on a rank-{x.ndim} input (2-D only)")
    if int(call.get("groups", 1)) != 1 or any(int(d) != 1 for d in call.get("dilations", [1, 1])):
        raise call.unsupported("grouped or dilated conv")
    kernel_h, kernel_w = weight.shape[2:]
    stride_h, stride_w = (int(v) for v in call.get("strides", [1, 1]))
    pad_type = str(call.get("pad_type", "valid"))
    if pad_type == "custom":
        top, bottom, left, right = (int(v) for v in call.get("pad", [0, 0, 0, 0]))
    elif pad_type == "valid":
        top = bottom = left = right = 0
    else:
        raise call.unsupported(f"pad_type {pad_type!r}")
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (kernel_h, kernel_w), axis=(2, 3))
    windows = windows[:, :, ::stride_h, ::stride_w]  # [N, C_in, H_out, W_out, kH, kW]
    out = np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True)
    bias = call.get("bias")
    return out if bias is None else out + np.asarray(bias)[None, :, None, None]


@register("matmul")
def matmul(call: OpCall) -> ArrayOut:
    """numpy-style batched matmul (1-D rules as np.matmul); fp16 computed in fp32."""
    x, y = np.asarray(call["x"]), np.asarray(call["y"])
    if x.ndim >= 2 and bool(call.get("transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if y.ndim >= 2 and bool(call.get("transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@register("einsum")
def einsum(call: OpCall) -> ArrayOut:
    return np.einsum(str(call["equation"]), *call["values"])


@register("scaled_dot_product_attention")
def scaled_dot_product_attention(call: OpCall) -> ArrayOut:
    q, k, v = _float(call["query"]), _float(call["key"]), _float(call["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    mask = call.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    scores = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    return np.matmul(scores / np.sum(scores, axis=-1, keepdims=True), v)


# ---------------------------------------------------------------------------------------------
# normalization


@register("layer_norm")
def layer_norm(call: OpCall) -> ArrayOut:
    x = _float(call["x"])
    axes = _axes(call.get("axes"), x.ndim) or tuple(range(x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + call.get("epsilon", 1e-5))
    param_shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    gamma, beta = call.get("gamma"), call.get("beta")
    if gamma is not None:
        out = out * np.asarray(gamma).reshape(param_shape)
    if beta is not None:
        out = out + np.asarray(beta).reshape(param_shape)
    return out


@register("batch_norm")
def batch_norm(call: OpCall) -> ArrayOut:
    x = _float(call["x"])

    def channel(name: str, default: float) -> np.ndarray:
        value = call.get(name)
        return np.float32(default) if value is None else _channel_param(value, x.ndim, 1)

    scale = channel("gamma", 1.0) / np.sqrt(channel("variance", 0.0) + call.get("epsilon", 1e-5))
    return (x - channel("mean", 0.0)) * scale + channel("beta", 0.0)


# ---------------------------------------------------------------------------------------------
# reductions


def _reduction(fn: Callable[..., np.ndarray]) -> OpFn:
    def run(call: OpCall) -> ArrayOut:
        x = np.asarray(call["x"])
        axes = _axes(call.get("axes"), x.ndim)
        return fn(x, axis=axes, keepdims=bool(call.get("keep_dims", False)))

    return run


def _log_sum_exp(x: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    x = _float(x)
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    out = np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak
    return out if keepdims else np.squeeze(out, axis=axis if axis is not None else None)


_REDUCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "reduce_sum": np.sum,
    "reduce_mean": lambda x, axis, keepdims: np.mean(_float(x), axis=axis, keepdims=keepdims),
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(np.square(x), axis=axis,
                                                          keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(
        np.sum(np.square(_float(x)), axis=axis, keepdims=keepdims)),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(
        np.sum(_float(x), axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _log_sum_exp,
}
for _name, _fn in _REDUCTIONS.items():
    OPS[_name] = _reduction(_fn)


def _arg_reduction(fn: Callable[..., np.ndarray]) -> OpFn:
    def run(call: OpCall) -> ArrayOut:
        x = np.asarray(call["x"])
        axis = _axis(call.get("axis", -1), x.ndim)
        return fn(x, axis=axis, keepdims=bool(call.get("keep_dims", False))).astype(np.int32)

    return run


OPS["reduce_argmax"] = _arg_reduction(np.argmax)
OPS["reduce_argmin"] = _arg_reduction(np.argmin)


# ---------------------------------------------------------------------------------------------
# shape manipulation


@register("shape")
def shape(call: OpCall) -> ArrayOut:
    return np.asarray(np.shape(call["x"]), dtype=np.int32)


@register("reshape")
def reshape(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    return x.reshape(_resolve_reshape(x.shape, _ints(call["shape"])))


def _resolve_reshape(in_shape: tuple[int, ...], target: list[int]) -> list[int]:
    """0 copies the input dim aligned from the right (iOS17 rule; 1 if none); -1 is inferred."""
    out = list(target)
    for i, dim in enumerate(target):
        if dim == 0:
            j = len(in_shape) - (len(target) - i)
            out[i] = in_shape[j] if j >= 0 else 1
    if out.count(-1) > 1:
        raise ValueError(f"reshape target {target} has more than one -1")
    return out


@register("expand_dims")
def expand_dims(call: OpCall) -> ArrayOut:
    return np.expand_dims(call["x"], tuple(_ints(call["axes"])))


@register("squeeze")
def squeeze(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    axes = _axes(call.get("axes"), x.ndim)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a for a in axes if x.shape[a] == 1))  # torch-style


@register("transpose")
def transpose(call: OpCall) -> ArrayOut:
    return np.transpose(call["x"], _ints(call["perm"]))


@register("flatten2d")
def flatten2d(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    axis = _int(call.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@register("concat")
def concat(call: OpCall) -> ArrayOut:
    values = [np.asarray(v) for v in call["values"]]
    if values[0].ndim == 0:  # MIL concatenates scalars into a vector (see concat type inference)
        return np.stack(values)
    axis = _axis(call["axis"], values[0].ndim)
    if not bool(call.get("interleave", False)):
        return np.concatenate(values, axis=axis)
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@register("stack")
def stack(call: OpCall) -> ArrayOut:
    values = [np.asarray(v) for v in call["values"]]
    return np.stack(values, axis=_int(call["axis"]))


@register("split")
def split(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    axis = _axis(call["axis"], x.ndim)
    sizes = call.get("split_sizes")
    if sizes is not None:
        sizes = _ints(sizes)
        if sum(sizes) != x.shape[axis]:
            raise ValueError(f"split sizes {sizes} do not sum to dim {x.shape[axis]}")
        return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))
    return tuple(np.split(x, _int(call["num_splits"]), axis=axis))


@register("tile")
def tile(call: OpCall) -> ArrayOut:
    return np.tile(call["x"], _ints(call["reps"]))


@register("reverse")
def reverse(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    return np.flip(x, axis=_axes(call.get("axes"), x.ndim))


@register("pad")
def pad(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    flat = _ints(call["pad"])
    if len(flat) % 2 or len(flat) // 2 > x.ndim or min(flat, default=0) < 0:
        raise call.unsupported(f"pad amounts {flat} for rank {x.ndim}")
    widths = [(0, 0)] * (x.ndim - len(flat) // 2) + list(zip(flat[::2], flat[1::2]))
    mode = str(call.get("mode", "constant"))
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=call.get("constant_val", 0.0))
    numpy_modes = {"reflect": "reflect", "replicate": "edge"}
    if mode not in numpy_modes:
        raise call.unsupported(f"pad mode '{mode}'")
    return np.pad(x, widths, mode=numpy_modes[mode])


# ---------------------------------------------------------------------------------------------
# slicing


def _index_tuple(call: OpCall, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """numpy index for slice_by_index / slice_update (python semantics for negative values)."""
    rank = len(shape)
    begin, end = _ints(call["begin"]), _ints(call["end"])
    stride = _ints(call["stride"]) if call.get("stride") is not None else [1] * rank
    begin_mask = _bools(call.get("begin_mask"), rank)
    end_mask = _bools(call.get("end_mask"), rank)
    squeeze_mask = _bools(call.get("squeeze_mask"), rank)
    if not len(begin) == len(end) == len(stride) == rank:
        raise ValueError(f"slice parameters do not match rank {rank}")
    index: list[Any] = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(0 if begin_mask[i] else begin[i])
        else:
            b = None if begin_mask[i] else begin[i]
            e = None if end_mask[i] else end[i]
            index.append(slice(b, e, stride[i]))
    return tuple(index)


@register("slice_by_index")
def slice_by_index(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    return np.asarray(x[_index_tuple(call, x.shape)])


@register("slice_by_size")
def slice_by_size(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    begin, size = _ints(call["begin"]), _ints(call["size"])
    index = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))
    return x[index]


@register("slice_update")
def slice_update(call: OpCall) -> ArrayOut:
    out = np.array(call["x"], copy=True)
    index = _index_tuple(call, out.shape)
    update = np.asarray(call["update"])
    target_shape = out[index].shape
    if int(np.prod(update.shape)) != int(np.prod(target_shape)):
        raise ValueError(f"update shape {update.shape} does not match slice {target_shape}")
    out[index] = update.reshape(target_shape)
    return out


# ---------------------------------------------------------------------------------------------
# gather / scatter


@register("gather")
def gather(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    axis = _axis(call.get("axis", 0), x.ndim)
    batch_dims = _int(call.get("batch_dims", 0))
    idx = _check_indices(call["indices"], x.shape[axis], call.opset < 17, "gather")
    return _gather_batched(x, idx, axis, batch_dims)


def _gather_batched(x: np.ndarray, idx: np.ndarray, axis: int, batch_dims: int) -> np.ndarray:
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    parts = [_gather_batched(x[i], idx[i], axis - 1, batch_dims - 1) for i in range(x.shape[0])]
    return np.stack(parts)


@register("gather_along_axis")
def gather_along_axis(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    axis = _axis(call.get("axis", 0), x.ndim)
    idx = _check_indices(call["indices"], x.shape[axis], call.opset < 17, "gather_along_axis")
    return np.take_along_axis(x, idx, axis=axis)


@register("gather_nd")
def gather_nd(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    idx = np.asarray(call["indices"]).astype(np.int64)
    batch_dims = _int(call.get("batch_dims", 0))
    return _gather_nd(x, idx, batch_dims, call.opset < 17)


def _gather_nd(x: np.ndarray, idx: np.ndarray, batch_dims: int, allow_negative: bool) -> np.ndarray:
    if batch_dims:
        return np.stack([_gather_nd(x[i], idx[i], batch_dims - 1, allow_negative)
                         for i in range(x.shape[0])])
    coords = tuple(_check_indices(idx[..., k], x.shape[k], allow_negative, "gather_nd")
                   for k in range(idx.shape[-1]))
    return x[coords]


_SCATTER_UFUNCS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
    "max": np.maximum, "min": np.minimum,
}


def _scatter_into(call: OpCall, out: np.ndarray, coords: tuple[np.ndarray, ...],
                  updates: np.ndarray) -> np.ndarray:
    mode = str(call.get("mode", "add"))
    if mode == "update":
        out[coords] = updates
    elif mode in _SCATTER_UFUNCS:
        _SCATTER_UFUNCS[mode].at(out, coords, updates)
    else:
        raise call.unsupported(f"scatter mode '{mode}'")
    return out


@register("scatter")
def scatter(call: OpCall) -> ArrayOut:
    out = np.array(call["data"], copy=True)
    axis = _axis(call.get("axis", 0), out.ndim)
    idx = _check_indices(call["indices"], out.shape[axis], call.opset < 17, "scatter")
    if idx.ndim != 1:
        raise call.unsupported(f"scatter with rank-{idx.ndim} indices")
    updates = np.asarray(call["updates"])
    grids = list(np.ix_(*[np.arange(d) for d in updates.shape]))
    grids[axis] = idx.reshape(grids[axis].shape)
    return _scatter_into(call, out, tuple(grids), updates)


@register("scatter_along_axis")
def scatter_along_axis(call: OpCall) -> ArrayOut:
    out = np.array(call["data"], copy=True)
    axis = _axis(call.get("axis", 0), out.ndim)
    idx = _check_indices(call["indices"], out.shape[axis], call.opset < 17, "scatter_along_axis")
    grids = list(np.ix_(*[np.arange(d) for d in idx.shape]))
    grids[axis] = idx
    return _scatter_into(call, out, tuple(grids), np.asarray(call["updates"]))


@register("scatter_nd")
def scatter_nd(call: OpCall) -> ArrayOut:
    out = np.array(call["data"], copy=True)
    idx = np.asarray(call["indices"]).astype(np.int64)
    coords = tuple(_check_indices(idx[..., k], out.shape[k], call.opset < 17, "scatter_nd")
                   for k in range(idx.shape[-1]))
    return _scatter_into(call, out, coords, np.asarray(call["updates"]))


# ---------------------------------------------------------------------------------------------
# tensor creation and misc


@register("select")
def select(call: OpCall) -> ArrayOut:
    return np.where(np.asarray(call["cond"]).astype(bool), call["a"], call["b"])


@register("fill")
def fill(call: OpCall) -> ArrayOut:
    return np.full(_ints(call["shape"]), call.get("value", 0.0))


@register("fill_like")
def fill_like(call: OpCall) -> ArrayOut:
    return np.full(np.shape(call["ref_tensor"]), call.get("value", 0.0))


@register("range_1d")
def range_1d(call: OpCall) -> ArrayOut:
    start, end, step = (np.asarray(call[k]).reshape(()) for k in ("start", "end", "step"))
    return np.arange(start, end, step)


@register("band_part")
def band_part(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    lower, upper = _int(call.get("lower", -1)), _int(call.get("upper", -1))
    rows = np.arange(x.shape[-2])[:, None]
    cols = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


@register("cumsum")
def cumsum(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    axis = _axis(call.get("axis", 0), x.ndim)
    reverse_ = bool(call.get("reverse", False))
    if reverse_:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if bool(call.get("exclusive", False)):  # shift by one: out[0] = 0, out[i] = sum(x[:i])
        head = np.zeros_like(np.take(out, [0], axis=axis))
        out = np.concatenate([head, np.take(out, np.arange(x.shape[axis] - 1), axis=axis)],
                             axis=axis)
    return np.flip(out, axis) if reverse_ else out


@register("one_hot")
def one_hot(call: OpCall) -> ArrayOut:
    idx = np.asarray(call["indices"]).astype(np.int64)
    depth = _int(call["one_hot_vector_size"])
    axis = _int(call.get("axis", -1))
    axis = axis + idx.ndim + 1 if axis < 0 else axis
    hot = np.expand_dims(idx, axis) == np.arange(depth).reshape(
        [depth if a == axis else 1 for a in range(idx.ndim + 1)])
    return np.where(hot, call.get("on_value", 1), call.get("off_value", 0))


def _sort_order(x: np.ndarray, axis: int, ascending: bool) -> np.ndarray:
    # stable sort; descending keeps the lower index first among ties
    key = x if ascending else -x.astype(np.float64) if x.dtype.kind in "biu" else -x
    return np.argsort(key, axis=axis, kind="stable")


@register("argsort")
def argsort(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    axis = _axis(call.get("axis", -1), x.ndim)
    return _sort_order(x, axis, bool(call.get("ascending", False))).astype(np.int32)


@register("topk")
def topk(call: OpCall) -> ArrayOut:
    x = np.asarray(call["x"])
    axis = _axis(call.get("axis", -1), x.ndim)
    k = _int(call.get("k", 1))
    if not bool(call.get("sort", True)):
        raise call.unsupported("topk with sort=False (output order is unspecified)")
    order = np.take(_sort_order(x, axis, bool(call.get("ascending", False))),
                    np.arange(k), axis=axis)
    values = np.take_along_axis(x, order, axis=axis)
    if not bool(call.get("return_indices", True)):
        return values
    return values, order.astype(np.int32)


# Control flow, run by the interpreter itself (mil_interpreter._Loop) rather than by an op function.
CONTROL_FLOW: frozenset[str] = frozenset({"while_loop"})
SUPPORTED_OPS: frozenset[str] = frozenset(OPS) | CONTROL_FLOW
