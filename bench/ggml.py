"""llama.cpp's Q8_0 / Q4_0 rounding of a CausalLM's weights: the quality anchor of the quantised recipes.

`llamacpp_rounded(model, "Q4_0")` returns a copy of the model whose weights hold exactly the values
`llama-quantize F32.gguf OUT.gguf Q4_0` stores (ggml-quants.c's reference rounding, bit for bit),
so one check run can put "the llama.cpp way" next to our own artifacts on the same weights and
text. It rounds weights only: llama.cpp's CPU kernels also round activations to 8 bits (Q8_0 /
Q8_K) inside each matmul, which this copy, run in fp32, does not. The per-tensor types follow llama-quantize's defaults
(`tensor_types`): every 2-D weight gets the requested type, except the output matrix (or the tied
embedding, which llama.cpp reuses as output), which Q4_0 keeps at Q6_K (Q8_0 when the row length is
not a multiple of 256); `pure=True` is `llama-quantize --pure` (every tensor at the requested type).
Tensors whose row length is not a multiple of the block fall back as llama-quantize does (-> F16).

Blocks run along the input dimension (the GGUF row: ne[0] = in_features). The gguf package has
numpy quantisers for Q8_0 and Q4_0 but none for Q6_K, and works on numpy copies of whole tensors;
this module ports ggml-quants.c's *_ref functions to torch (same fp32 operations in the same order,
true divisions where C divides) so the copy is made in place of the weights, for all three types.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cpm_mobile.exporter.errors import InputError

FTYPES = ("Q8_0", "Q4_0")
BLOCK = 32  # QK8_0 = QK4_0
SUPER_BLOCK = 256  # QK_K
_GROUP_MAX_EPS = 1e-15
# llama.cpp never quantises an MoE router (ffn_gate_inp); BlockFFN's router is its nearest kin.
_KEPT_FP32 = ("router_proj",)


@dataclass(frozen=True)
class Q8_0:
    codes: torch.Tensor  # int8 [..., blocks, 32]
    d: torch.Tensor  # float16 [..., blocks]

    def dequantize(self) -> torch.Tensor:
        return _unblock(self.codes.float() * self.d.float()[..., None])


@dataclass(frozen=True)
class Q4_0:
    codes: torch.Tensor  # uint8 0..15 [..., blocks, 32]; value = (code - 8) * d
    d: torch.Tensor  # float16 [..., blocks]

    def dequantize(self) -> torch.Tensor:
        return _unblock((self.codes.float() - 8) * self.d.float()[..., None])


@dataclass(frozen=True)
class Q6_K:
    codes: torch.Tensor  # uint8 0..63 [..., blocks, 16, 16]; value = d * scales * (code - 32)
    scales: torch.Tensor  # int8 [..., blocks, 16], one per 16 values
    d: torch.Tensor  # float16 [..., blocks]

    def dequantize(self) -> torch.Tensor:
        step = self.d.float()[..., None] * self.scales.float()
        return _unblock(((self.codes.float() - 32) * step[..., None]).flatten(-2))


def quantize_q8_0(weight: torch.Tensor) -> Q8_0:
    """quantize_row_q8_0_ref: d = max|x| / 127 (stored fp16), q = roundf(x * (1/d))."""
    x = _blocks(weight, BLOCK)
    d = _div(x.abs().amax(-1, keepdim=True), 127.0)
    codes = _roundf(x * _inverse(d)).to(torch.int8)
    return Q8_0(codes, d.squeeze(-1).to(torch.float16))


def quantize_q4_0(weight: torch.Tensor) -> Q4_0:
    """quantize_row_q4_0_ref: d = (signed value of largest magnitude) / -8, q = min(15, (int)(x/d + 8.5))."""
    x = _blocks(weight, BLOCK)
    d = _div(_signed_peak(x), -8.0)
    codes = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return Q4_0(codes, d.squeeze(-1).to(torch.float16))


def quantize_q6_k(weight: torch.Tensor) -> Q6_K:
    """quantize_row_q6_K_ref: per 16 values a scale from make_qx_quants(16, 32, rmse_type=1), the 16
    scales of a 256-block quantised to int8 against one fp16 d, then every value re-rounded to 6 bits."""
    x = _blocks(weight, SUPER_BLOCK).unflatten(-1, (16, 16))
    sub_scale, codes = _make_qx_quants(x, nmax=32)
    max_scale = _signed_peak(sub_scale)  # [..., blocks, 1]
    empty = max_scale.abs() < _GROUP_MAX_EPS
    iscale = _div(torch.full_like(max_scale, -128.0), torch.where(empty, 1.0, max_scale))
    d = torch.where(empty, 0.0, _inverse(iscale)).to(torch.float16)
    scales = torch.where(empty, 0.0, torch.round(iscale * sub_scale).clamp(max=127))
    step = d.float() * scales  # [..., blocks, 16]
    live = step != 0
    requant = torch.round(_div(x, torch.where(live, step, 1.0)[..., None])).clamp(-32, 31) + 32
    codes = torch.where(live[..., None], requant, torch.where(empty[..., None], 0.0, codes))
    return Q6_K(codes.to(torch.uint8), scales.to(torch.int8), d.squeeze(-1))


def gguf_blocks(quantized: Q8_0 | Q4_0 | Q6_K) -> np.ndarray:
    """The blocks as a GGUF file stores them (uint8 [blocks, bytes]): block_q8_0 {d, qs[32]},
    block_q4_0 {d, qs[16]: low nibbles j, high nibbles j + 16}, block_q6_K {ql[128], qh[64], scales[16], d}."""
    d = quantized.d.reshape(-1, 1).numpy().view(np.uint8)
    if isinstance(quantized, Q8_0):
        return np.concatenate([d, quantized.codes.reshape(-1, BLOCK).numpy().view(np.uint8)], axis=1)
    if isinstance(quantized, Q4_0):
        codes = quantized.codes.reshape(-1, 2, BLOCK // 2).numpy()
        return np.concatenate([d, codes[:, 0] | (codes[:, 1] << 4)], axis=1)
    # Each 128 values: ql holds the low 4 bits of quarters (0, 2) and (1, 3), qh the top 2 bits of all four.
    a, b, c, e = np.moveaxis(quantized.codes.reshape(-1, 2, 4, 32).numpy(), 2, 0)
    ql = np.concatenate([(a & 15) | ((c & 15) << 4), (b & 15) | ((e & 15) << 4)], axis=2).reshape(-1, 128)
    qh = ((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)).reshape(-1, 64)
    scales = quantized.scales.reshape(-1, 16).numpy().view(np.uint8)
    return np.concatenate([ql, qh, scales, d], axis=1)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q6_K": quantize_q6_k}


def round_like_ggml(weight: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """The fp32 values llama.cpp computes with for `weight` stored as `ggml_type`."""
    if ggml_type == "F32":
        return weight.float().clone()
    if ggml_type == "F16":
        return weight.to(torch.float16).float()
    return QUANTIZERS[ggml_type](weight).dequantize().reshape(weight.shape)


def tensor_types(model: nn.Module, ftype: str, pure: bool = False) -> dict[str, str]:
    """Weight name -> the ggml type `llama-quantize [--pure] F32.gguf OUT.gguf FTYPE` stores it in.

    Mirrors llama_tensor_get_type (src/llama-quant.cpp) for the Q8_0 / Q4_0 file types: norms and
    other 1-D tensors stay F32; the output matrix, or the token embedding when it is tied to the
    output, takes Q8_0 if its rows are not a multiple of 32 or the file type is Q8_0, Q6_K otherwise;
    then any type whose block does not divide the row falls back (Q6_K -> Q8_0, 32-blocks -> F16).
    """
    if ftype not in FTYPES:
        raise InputError("ftype", f"'{ftype}' is not a llama.cpp type this anchor rounds; allowed: {', '.join(FTYPES)}")
    tied = bool(getattr(model, "tied", False))
    types: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if tied and leaf == "lm_head":
            continue  # one tensor with the embedding: quantised under its name
        columns = module.weight.shape[-1]
        if leaf in _KEPT_FP32:
            types[f"{name}.weight"] = "F32"
            continue
        kind = ftype
        is_output = leaf == "lm_head" or (tied and leaf == "embed_tokens")
        if is_output and not pure:
            kind = "Q8_0" if columns % BLOCK or ftype == "Q8_0" else "Q6_K"
        types[f"{name}.weight"] = _fallback(kind, columns)
    return types


def llamacpp_rounded(model: nn.Module, ftype: str, pure: bool = False) -> nn.Module:
    """A copy of `model` whose weights hold llama.cpp's `ftype` values (see tensor_types)."""
    types = tensor_types(model, ftype, pure)
    rounded = copy.deepcopy(model)  # deepcopy keeps a tied lm_head the same Parameter as the embedding
    parameters = dict(rounded.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, ggml_type in types.items():
            weight = parameters[name]
            weight.copy_(round_like_ggml(weight.detach(), ggml_type).to(weight.dtype))
    return rounded


def _fallback(kind: str, columns: int) -> str:
    if kind == "Q6_K" and columns % SUPER_BLOCK:
        kind = "Q8_0"
    if kind in ("Q8_0", "Q4_0") and columns % BLOCK:
        kind = "F16"
    return kind


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n=16, nmax, rmse_type=1, qw=NULL) over the last dim: the scale that maximises
    sum(w*x*l)^2 / sum(w*l^2) with w = x^2 over 19 candidate inverse scales; codes are l + nmax."""
    peak = _signed_peak(x)
    empty = peak.abs() < _GROUP_MAX_EPS
    peak = torch.where(empty, 1.0, peak)
    weight = x * x

    def candidate(numerator: np.float32):
        levels = torch.round(_div(torch.full_like(peak, float(numerator)), peak) * x).clamp(-nmax, nmax - 1)
        sum_lx = torch.zeros_like(peak[..., 0])
        sum_l2 = torch.zeros_like(sum_lx)
        for i in range(x.shape[-1]):  # sequential fp32 sums, as the C loop adds them
            w, level = weight[..., i], levels[..., i]
            sum_lx = sum_lx + w * x[..., i] * level
            sum_l2 = sum_l2 + w * level * level
        return levels, sum_lx, sum_l2

    levels, sum_lx, sum_l2 = candidate(np.float32(-nmax))
    scale = torch.where(sum_l2 != 0, _div(sum_lx, torch.where(sum_l2 != 0, sum_l2, 1.0)), 0.0)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        numerator = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        trial, trial_lx, trial_l2 = candidate(numerator)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        levels = torch.where(better[..., None], trial, levels)
        scale = torch.where(better, _div(trial_lx, torch.where(better, trial_l2, 1.0)), scale)
        best = torch.where(better, scale * trial_lx, best)
    scale = torch.where(empty[..., 0], 0.0, scale)
    codes = torch.where(empty, 0.0, levels + nmax)
    return scale, codes


def _blocks(weight: torch.Tensor, size: int) -> torch.Tensor:
    if weight.shape[-1] % size:
        raise ValueError(f"row length {weight.shape[-1]} is not a multiple of the block size {size}")
    return weight.detach().float().unflatten(-1, (-1, size))


def _unblock(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(-2)


def _signed_peak(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude, with its sign; the first one on ties (the C loops' strict compare)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def _div(numerator: torch.Tensor, denominator: torch.Tensor | float) -> torch.Tensor:
    # Tensor-by-tensor true division: torch turns `scalar / tensor` into reciprocal-times-scalar,
    # which rounds twice and would differ from C's single division in the last bit.
    if not isinstance(denominator, torch.Tensor):
        denominator = torch.full_like(numerator, denominator)
    return torch.div(numerator, denominator)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """C's `d ? 1.0f/d : 0.0f`."""
    return torch.where(d == 0, 0.0, _div(torch.ones_like(d), torch.where(d == 0, 1.0, d)))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (halves away from zero); floor(|x| + 0.5) would round 0.49999997 up."""
    magnitude = x.abs()
    whole = torch.floor(magnitude)
    return torch.sign(x) * (whole + torch.floor(2 * (magnitude - whole)))
