"""The AOT definition of cpm_mobile::sparse_expert_ffn for torch.export (the one place it is defined:
defining the namespace twice in a process raises).

sparse_expert_ffn(x [N, H], scores [N, E], up [E*de, H], down [E*de, H]) -> [N, H]
    out[t] = sum_{e: scores[t, e] != 0} sum_j SiLU(x[t] . up[e*de+j]) * scores[t, e] * down[e*de+j]

`scores` are BlockFFN's router output (ReLU + RMSNorm: idle experts score an exact zero), `up` the
dense up projection's weight, `down` the dense down projection's weight transposed (one row per
expert unit). The PyTorch implementation here gives eager runs and export tracing the same numbers
as the C++ kernel (sparse_expert_ffn.cpp) that a .pte calls; it computes only the experts some
token activates, like the kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cpm_mobile.exporter.kernels.gated_delta_chunked import gated_delta_chunked

NAMESPACE = "cpm_mobile"
OP_NAME = "sparse_expert_ffn"
KERNEL = f"{NAMESPACE}::{OP_NAME}.out"  # the name the .pte's plan holds and the C++ library registers

_library = torch.library.Library(NAMESPACE, "DEF")
_library.define(f"{OP_NAME}(Tensor x, Tensor scores, Tensor up, Tensor down) -> Tensor")
_library.define(f"{OP_NAME}.out(Tensor x, Tensor scores, Tensor up, Tensor down, *, Tensor(a!) out) -> Tensor(a!)")


def _compute(x: torch.Tensor, scores: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    experts = scores.shape[1]
    width = up.shape[0] // experts
    ids = torch.nonzero((scores != 0).any(dim=0)).reshape(-1)
    units = (ids[:, None] * width + torch.arange(width)).reshape(-1)  # the active experts' rows
    inner = F.silu(x @ up.index_select(0, units).t()) * scores.index_select(1, ids).repeat_interleave(width, dim=1)
    return inner @ down.index_select(0, units)


@torch.library.impl(_library, OP_NAME, "CompositeExplicitAutograd")
def _functional(x, scores, up, down):
    return _compute(x, scores, up, down)


@torch.library.impl(_library, OP_NAME, "Meta")
def _functional_meta(x, scores, up, down):
    return torch.empty_like(x)


@torch.library.impl(_library, f"{OP_NAME}.out", "CompositeExplicitAutograd")
def _out(x, scores, up, down, *, out):
    result = _compute(x, scores, up, down)
    out.resize_(result.shape)
    return out.copy_(result)


@torch.library.impl(_library, f"{OP_NAME}.out", "Meta")
def _out_meta(x, scores, up, down, *, out):
    out.resize_(x.shape)
    return out


def sparse_expert_ffn(x: torch.Tensor, scores: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return torch.ops.cpm_mobile.sparse_expert_ffn.default(x, scores, up, down)


# -- quantised weights ---------------------------------------------------------------------------
#
# sparse_expert_ffn_int8(x, scores, up int8 [E*de, H], up_scales fp32 [E*de],
#                        down int8 [E*de, H], down_scales fp32 [H]) -> [N, H]
# sparse_expert_ffn_int4(x, scores, up uint8 [E*de, H/2], up_scales [E*de, H/gu],
#                        down uint8 [E*de, H/2], down_scales [E*de/gd, H]) -> [N, H]   (scales fp32 or bf16)
#
# The same computation with the up rows and down rows dequantised (code x scale) from the codes of
# torchao's per-channel int8 / blockwise int4 quantisation of the dense up [E*de, H] and down
# [H, E*de] weights (exporter/quant/sparse_executorch.py); activations stay fp32. int4 codes are
# packed as the C++ kernel reads them (pack_int4). Only the active experts' rows are dequantised.

QUANTISED_OPS = {8: "sparse_expert_ffn_int8", 4: "sparse_expert_ffn_int4"}
KERNELS_QUANTISED = {bits: f"{NAMESPACE}::{name}.out" for bits, name in QUANTISED_OPS.items()}
INT4_CHUNK = 32  # codes per packing chunk: byte i holds code i (low nibble) and code i + 16 (high)

for _name in QUANTISED_OPS.values():
    _library.define(f"{_name}(Tensor x, Tensor scores, Tensor up, Tensor up_scales, Tensor down, "
                    "Tensor down_scales) -> Tensor")
    _library.define(f"{_name}.out(Tensor x, Tensor scores, Tensor up, Tensor up_scales, Tensor down, "
                    "Tensor down_scales, *, Tensor(a!) out) -> Tensor(a!)")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in -8..7, [R, C] with C a multiple of 32 -> uint8 [R, C / 2] in the kernel's order."""
    rows, cols = codes.shape
    chunks = codes.to(torch.int16).reshape(rows, cols // INT4_CHUNK, INT4_CHUNK) & 0xF
    packed = chunks[..., :INT4_CHUNK // 2] | (chunks[..., INT4_CHUNK // 2:] << 4)
    return packed.to(torch.uint8).reshape(rows, cols // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 [R, C / 2] -> int8 codes [R, C]."""
    rows, half = packed.shape
    chunks = packed.to(torch.int16).reshape(rows, half // (INT4_CHUNK // 2), INT4_CHUNK // 2)
    nibbles = torch.cat([chunks & 0xF, chunks >> 4], dim=-1)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8).reshape(rows, 2 * half)


def _active_units(scores: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    experts = scores.shape[1]
    width = units // experts
    ids = torch.nonzero((scores != 0).any(dim=0)).reshape(-1)
    return ids, (ids[:, None] * width + torch.arange(width)).reshape(-1)


def dequantised_rows(bits: int, up, up_scales, down, down_scales, units: torch.Tensor | None = None):
    """The fp32 up rows and down rows [len(units), H] (all units when None) the codes stand for."""
    if units is None:
        units = torch.arange(up.shape[0])
    if bits == 8:
        up_rows = up.index_select(0, units).float() * up_scales.float().index_select(0, units)[:, None]
        down_rows = down.index_select(0, units).float() * down_scales.float()[None, :]
        return up_rows, down_rows
    hidden = up.shape[1] * 2
    up_group = hidden // up_scales.shape[1]
    down_group = up.shape[0] // down_scales.shape[0]
    up_rows = unpack_int4(up.index_select(0, units)).float() * \
        up_scales.float().index_select(0, units).repeat_interleave(up_group, dim=1)
    down_rows = unpack_int4(down.index_select(0, units)).float() * \
        down_scales.float().index_select(0, torch.div(units, down_group, rounding_mode="floor"))
    return up_rows, down_rows


def _quantised_impls(bits: int, name: str) -> None:
    def compute(x, scores, up, up_scales, down, down_scales):
        ids, units = _active_units(scores, up.shape[0])
        up_rows, down_rows = dequantised_rows(bits, up, up_scales, down, down_scales, units)
        inner = F.silu(x @ up_rows.t()) * scores.index_select(1, ids).repeat_interleave(
            up.shape[0] // scores.shape[1], dim=1)
        return inner @ down_rows

    @torch.library.impl(_library, name, "CompositeExplicitAutograd")
    def _functional(x, scores, up, up_scales, down, down_scales):
        return compute(x, scores, up, up_scales, down, down_scales)

    @torch.library.impl(_library, name, "Meta")
    def _functional_meta(x, scores, up, up_scales, down, down_scales):
        return torch.empty_like(x)

    @torch.library.impl(_library, f"{name}.out", "CompositeExplicitAutograd")
    def _out(x, scores, up, up_scales, down, down_scales, *, out):
        result = compute(x, scores, up, up_scales, down, down_scales)
        out.resize_(result.shape)
        return out.copy_(result)

    @torch.library.impl(_library, f"{name}.out", "Meta")
    def _out_meta(x, scores, up, up_scales, down, down_scales, *, out):
        out.resize_(x.shape)
        return out


for _bits, _name in QUANTISED_OPS.items():
    _quantised_impls(_bits, _name)


def sparse_expert_ffn_quantised(bits: int, x: torch.Tensor, scores: torch.Tensor, up: torch.Tensor,
                                up_scales: torch.Tensor, down: torch.Tensor, down_scales: torch.Tensor) -> torch.Tensor:
    op = getattr(torch.ops.cpm_mobile, QUANTISED_OPS[bits]).default
    return op(x, scores, up, up_scales, down, down_scales)


# -- weight-only linears ---------------------------------------------------------------------------
#
# linear_q8x4(x [..., K], packed uint8 [ceil(N / 4), K / 32, 136], int N) -> [..., N]
# linear_q4x4(x [..., K], packed uint8 [ceil(N / 4), K / 32, 72], int N) -> [..., N]
#
# x @ (code x scale).T with fp32 activations, one scale per 32 input columns, the weight packed in tiles
# of 4 rows x 32 columns in the order the kernel streams them (runtimes/kernels/linear_weight_only.cpp):
#   8-bit: 4 fp16 scales, then the 4 rows' 32 int8 codes;
#   4-bit: 4 bf16 scales, then the 4 rows' 32 codes as 16 bytes each (the pack_int4 order).
# The eager form below is the twin's: the same dequantised weight in another summation order.

LINEAR_OPS = {8: "linear_q8x4", 4: "linear_q4x4"}
KERNELS_LINEAR = {bits: f"{NAMESPACE}::{name}.out" for bits, name in LINEAR_OPS.items()}
TILE_ROWS = 4
TILE_BLOCK = 32
SCALE_DTYPES = {8: torch.float16, 4: torch.bfloat16}  # 8 bits: Q8_0's 34 bytes per 32 weights

for _name in LINEAR_OPS.values():
    _library.define(f"{_name}(Tensor x, Tensor packed, int out_features) -> Tensor")
    _library.define(f"{_name}.out(Tensor x, Tensor packed, int out_features, *, Tensor(a!) out) -> Tensor(a!)")


def scale_bytes(bits: int) -> int:
    """Bytes of one stored scale (fp16 for 8 bits, bf16 for 4)."""
    return torch.finfo(SCALE_DTYPES[bits]).bits // 8


def tile_bytes(bits: int) -> int:
    return TILE_ROWS * (scale_bytes(bits) + TILE_BLOCK * bits // 8)


def pack_tiles(bits: int, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] (4-bit: values in -8..7) and one scale per 32 columns [N, K / 32] -> the kernel's tiles.
    The scales are stored as SCALE_DTYPES[bits] and must already be exactly that (no silent rounding)."""
    rows, columns = codes.shape
    if columns % TILE_BLOCK or scales.shape != (rows, columns // TILE_BLOCK):
        raise ValueError(f"weight-only tiles need K a multiple of {TILE_BLOCK} and one scale per {TILE_BLOCK} "
                         f"columns; got codes {tuple(codes.shape)}, scales {tuple(scales.shape)}")
    stored = scales.to(SCALE_DTYPES[bits])
    if not torch.equal(stored.float(), scales.float()):
        raise ValueError(f"{bits}-bit tiles store {SCALE_DTYPES[bits]} scales: round them first")
    padded = -rows % TILE_ROWS
    codes = F.pad(codes, (0, 0, 0, padded))
    stored = F.pad(stored, (0, 0, 0, padded), value=1.0)
    tiles, blocks = codes.shape[0] // TILE_ROWS, columns // TILE_BLOCK
    if bits == 8:
        code_bytes = codes.reshape(tiles, TILE_ROWS, blocks, TILE_BLOCK).transpose(1, 2).view(torch.uint8)
    else:
        code_bytes = pack_int4(codes).reshape(tiles, TILE_ROWS, blocks, TILE_BLOCK // 2).transpose(1, 2)
    scale_head = stored.reshape(tiles, TILE_ROWS, blocks).transpose(1, 2).contiguous().view(torch.uint8)
    return torch.cat([scale_head, code_bytes.reshape(tiles, blocks, -1)], dim=-1).contiguous()


def unpack_tiles(bits: int, packed: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_tiles: (int8 codes [N, K], scales [N, K / 32] in their stored dtype)."""
    tiles, blocks, _ = packed.shape
    head = scale_bytes(bits) * TILE_ROWS  # the tile's scales, then its codes
    scales = packed[..., :head].contiguous().view(SCALE_DTYPES[bits])  # [tiles, blocks, 4]
    scales = scales.transpose(1, 2).reshape(tiles * TILE_ROWS, blocks)
    code_bytes = packed[..., head:].reshape(tiles, blocks, TILE_ROWS, -1).transpose(1, 2)
    code_bytes = code_bytes.reshape(tiles * TILE_ROWS, -1).contiguous()
    codes = code_bytes.view(torch.int8) if bits == 8 else unpack_int4(code_bytes)
    return codes[:out_features], scales[:out_features]


def tiles_dequantised(bits: int, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The fp32 [N, K] weight the tiles stand for."""
    codes, scales = unpack_tiles(bits, packed, out_features)
    return codes.float() * scales.float().repeat_interleave(TILE_BLOCK, dim=1)


def _linear_impls(bits: int, name: str) -> None:
    def output_shape(x, out_features):
        return (*x.shape[:-1], out_features)

    @torch.library.impl(_library, name, "CompositeExplicitAutograd")
    def _functional(x, packed, out_features):
        return F.linear(x, tiles_dequantised(bits, packed, out_features))

    @torch.library.impl(_library, name, "Meta")
    def _functional_meta(x, packed, out_features):
        return x.new_empty(output_shape(x, out_features))

    @torch.library.impl(_library, f"{name}.out", "CompositeExplicitAutograd")
    def _out(x, packed, out_features, *, out):
        result = F.linear(x, tiles_dequantised(bits, packed, out_features))
        out.resize_(result.shape)
        return out.copy_(result)

    @torch.library.impl(_library, f"{name}.out", "Meta")
    def _out_meta(x, packed, out_features, *, out):
        out.resize_(output_shape(x, out_features))
        return out


for _bits, _name in LINEAR_OPS.items():
    _linear_impls(_bits, _name)


def linear_tiles(bits: int, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return getattr(torch.ops.cpm_mobile, LINEAR_OPS[bits]).default(x, packed, out_features)


# -- Gated DeltaNet recurrence -------------------------------------------------------------------
#
# gated_delta_rule(q [1, T, H, Dk], k [1, T, H, Dk], v [1, T, H, Dv], g [1, T, H], beta [1, T, H],
#                  state [1, H, Dk, Dv], scale) -> (out [1, T, H, Dv], new_state [1, H, Dk, Dv])
#     for each token t, per head:  S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  out_t = scale S^T q_t
#
# Qwen3.5's linear attention (transformers' torch_recurrent_gated_delta_rule), q and k already L2-normalised
# and repeated to the value heads. One op for any T: a prefill and a decode step run the same recurrence,
# so the graph has no loop over a dynamic length (the C++ kernel, gated_delta_rule.cpp, and onnxruntime's
# com.microsoft LinearAttention run it). State and arithmetic are fp32 whatever the activations' dtype.

GATED_DELTA_OP = "gated_delta_rule"
KERNEL_GATED_DELTA = f"{NAMESPACE}::{GATED_DELTA_OP}.out"

_library.define(f"{GATED_DELTA_OP}(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state, float scale)"
                " -> (Tensor, Tensor)")
_library.define(f"{GATED_DELTA_OP}.out(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state, "
                "float scale, *, Tensor(a!) out, Tensor(b!) state_out) -> (Tensor(a!) out, Tensor(b!) state_out)")


def gated_delta_recurrence(q, k, v, g, beta, state, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token in fp32 (the definition; the kernels compute the same sums)."""
    dtype = v.dtype
    q, k, v, g, beta = (x[0].float() for x in (q, k, v, g, beta))
    s = state[0].float()
    outs = []
    for t in range(q.shape[0]):
        s = s * g[t].exp()[:, None, None]
        memory = torch.einsum("hkv,hk->hv", s, k[t])
        delta = (v[t] - memory) * beta[t][:, None]
        s = s + k[t][:, :, None] * delta[:, None, :]
        outs.append(torch.einsum("hkv,hk->hv", s, q[t]) * scale)
    out = torch.stack(outs) if outs else v.new_zeros(v.shape)
    return out[None].to(dtype), s[None].to(state.dtype)


CHUNKED_FROM = 8  # tokens per call from which the eager op runs the chunked form (the same sums, ~9x faster at 256)


def _gated_delta_eager(q, k, v, g, beta, state, scale):
    if q.shape[1] >= CHUNKED_FROM:
        return gated_delta_chunked(q, k, v, g, beta, state, scale)
    return gated_delta_recurrence(q, k, v, g, beta, state, scale)


@torch.library.impl(_library, GATED_DELTA_OP, "CompositeExplicitAutograd")
def _gated_delta(q, k, v, g, beta, state, scale):
    return _gated_delta_eager(q, k, v, g, beta, state, scale)


@torch.library.impl(_library, GATED_DELTA_OP, "Meta")
def _gated_delta_meta(q, k, v, g, beta, state, scale):
    return torch.empty_like(v), torch.empty_like(state)


@torch.library.impl(_library, f"{GATED_DELTA_OP}.out", "CompositeExplicitAutograd")
def _gated_delta_out(q, k, v, g, beta, state, scale, *, out, state_out):
    result, new_state = _gated_delta_eager(q, k, v, g, beta, state, scale)
    out.resize_(result.shape)
    state_out.resize_(new_state.shape)
    return out.copy_(result), state_out.copy_(new_state)


@torch.library.impl(_library, f"{GATED_DELTA_OP}.out", "Meta")
def _gated_delta_out_meta(q, k, v, g, beta, state, scale, *, out, state_out):
    out.resize_(v.shape)
    state_out.resize_(state.shape)
    return out, state_out


def gated_delta_rule(q, k, v, g, beta, state, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.cpm_mobile.gated_delta_rule.default(q, k, v, g, beta, state, scale)
