"""Quantise a CausalLM the way its .pte will run it: torchao weights for XNNPACK and ExecuTorch's embedding kernels.

`quantize_for_executorch(model, scheme)` returns a variant (exporter/models/variant.py) whose linears,
embedding and lm_head hold torchao `IntxUnpackedToInt8Tensor` weights; the source model is untouched.
The variant is both what the ExecuTorch target exports (torch.export sees torchao's dequantize +
dynamic-activation pattern, which XNNPACK's partitioner turns into its integer GEMMs and
ExecuTorch's quant fusion into quantized_decomposed::embedding_*) and, run eagerly, the twin.

Two details make the twin exact rather than approximate:
- ExecuTorch serialises the scales of XNNPACK's 4-bit linears as bf16 (per-channel-group quant params,
  backends/xnnpack/operators/node_visitor.py; a per-channel 4-bit weight is one group of the whole row),
  so those scales are rounded to bf16 here and the codes recomputed with them; 8-bit per-channel
  scales stay fp32 as XNNPACK keeps them. With that, one linear in XNNPACK matches the eager
  torchao module to 132 dB SQNR (fp32 rounding), against 54 dB with fp32 scales.
- Weights are symmetric: XNNPACK 1.5.1 accepts asymmetric 4-bit weights but ignores their zero point.

A tied embedding gets two quantised copies: the gather (weight-only, ExecuTorch embedding kernel)
and the lm_head (a dynamic-activation linear through XNNPACK). They share no tensor in the .pte.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.variant import derive
from cpm_mobile.exporter.targets.executorch.spec import Int4Scheme, Int8Scheme, TernaryScheme, weight_only

Scheme = Int8Scheme | Int4Scheme | TernaryScheme
BITS = {"int8": 8, "int4": 4}
TERNARY_CODE_BITS = 4  # the narrowest weight XNNPACK runs; ternary codes -1/0/+1 fill 3 of its 16 values


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao's import logs a warning per CUDA extension it cannot load on a CPU-only machine."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def quantize_for_executorch(model: CausalLM, scheme: Scheme) -> CausalLM:
    """The variant of `model` with the weights the .pte will store, as torchao tensors (see the module docstring)."""
    check_fits(model, scheme)
    with _quiet(), torch.no_grad():
        plan = _plan(model, scheme)

        def replace(name: str, module: nn.Module) -> Optional[nn.Module]:
            if name not in plan:
                return None
            return plan[name](module)

        return derive(model, replace)


def _plan(model: CausalLM, scheme: Scheme) -> dict[str, "callable"]:
    """Module name -> function building its quantised replacement."""
    linear_bits = TERNARY_CODE_BITS if scheme.scheme == "ternary" else BITS[scheme.scheme]
    grid = model.config.weight_grid
    # A linear's codes and scales become XNNPACK's linear (int8 activations) or our weight-only kernel's module,
    # whose tiles store the scales in their own dtype (rounded to it before the codes are chosen).
    if weight_only(scheme):
        from cpm_mobile.exporter.kernels.ops import SCALE_DTYPES

        as_module, dynamic, scale_dtype = _weight_only, False, SCALE_DTYPES.get
    else:
        as_module, dynamic, scale_dtype = _linear, True, lambda bits: None
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            if grid is not None:
                entry = grid.linears[f"{name}.weight"]
                # a mixed grid's 8-bit linear: our weight-only kernel (XNNPACK has no 8-bit blocks)
                if entry.bits == 8:
                    plan[name] = lambda m, e=entry: grid_weight_only(m, e)
                else:
                    plan[name] = lambda m, e=entry: as_module(m, _grid_intx(e))
            elif scheme.scheme == "ternary":
                plan[name] = lambda m, g=scheme.group_size: _linear(m, _ternary(m.weight, g))
            else:
                plan[name] = lambda m: as_module(m, _intx(m.weight, linear_bits, scheme.group_size, scheme.rounding,
                                                          dynamic, scale_dtype(linear_bits)))
    if scheme.lm_head != "fp32":
        bits = BITS[scheme.lm_head]
        group = scheme.group_size if bits == 4 or weight_only(scheme) else None
        rounding = "rtn" if scheme.scheme == "ternary" else scheme.rounding
        plan["lm_head"] = lambda m, b=bits, g=group, r=rounding: as_module(m, _intx(m.weight, b, g, r, dynamic,
                                                                                    scale_dtype(b)))
    if scheme.embedding != "fp32":
        bits = BITS[scheme.embedding]
        group = getattr(scheme, "embedding_group_size", None) if bits == 4 else None
        rounding = "rtn" if scheme.scheme == "ternary" else scheme.rounding
        plan["embed_tokens"] = lambda m, b=bits, g=group, r=rounding: _embedding(m, _intx(m.weight, b, g, r,
                                                                                          dynamic_activations=False))
    from cpm_mobile.exporter.targets.executorch.sparse import sparse_ffn_plan

    plan.update(sparse_ffn_plan(model, plan, scheme.group_size))  # fused sparse experts: same codes, our kernel
    return plan


def check_fits(model: CausalLM, scheme: Scheme) -> None:
    """Every group size divides the input dim it splits, and the checkpoint's grid is one XNNPACK
    runs as it is, before any work."""
    from cpm_mobile.exporter.targets.executorch.spec import CAPABILITIES
    from cpm_mobile.exporter.targets.grid import check_grid

    check_grid(model, scheme, CAPABILITIES.grid, "executorch")
    grid = model.config.weight_grid
    for name, entry in (grid.linears.items() if grid is not None else ()):
        if entry.bits == 8 and (entry.group_size != 32 or not entry.symmetric or not torch.equal(
                entry.scales.to(torch.float16).to(torch.float32), entry.scales)):
            raise InputError("quantization", f"{name} is an 8-bit linear of the grid; our weight-only kernel "
                                             f"linear_q8x4 carries symmetric blocks of 32 with fp16 scales only")
    if weight_only(scheme):
        from cpm_mobile.exporter.kernels.fused_ffn import FusedSparseBlockFFN

        if any(isinstance(module, FusedSparseBlockFFN) for module in model.modules()):
            raise InputError("quantization.activations", "fp32 (the weight-only kernels) does not combine with the "
                                                         "fused sparse experts, whose kernels take XNNPACK's "
                                                         "grids: use activations int8")
        grid = model.config.weight_grid
        if grid is not None and any(entry.group_size != 32 for entry in grid.linears.values()):
            raise InputError("quantization.activations", "fp32 (the weight-only kernels) carries blocks of 32 only; "
                                                         "the checkpoint's grid has other blocks")
    group = scheme.group_size
    if group is not None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (name != "lm_head" or BITS.get(scheme.lm_head) == 4):
                if module.in_features % group:
                    raise InputError("quantization.group_size", f"{group} does not divide the input dim "
                                                                f"{module.in_features} of {name}")
    embedding_group = getattr(scheme, "embedding_group_size", None)
    if scheme.embedding == "int4" and embedding_group is not None and model.config.hidden_size % embedding_group:
        raise InputError("quantization.embedding_group_size", f"{embedding_group} does not divide the embedding "
                                                              f"width {model.config.hidden_size}")


# -- weights ---------------------------------------------------------------------------------------


def _intx(weight: torch.Tensor, bits: int, group_size: Optional[int], rounding: str, dynamic_activations: bool,
          scale_dtype: Optional[torch.dtype] = None):
    """torchao's symmetric intx weight (round to nearest or HQQ's scale search), its scales rounded to
    `scale_dtype` (default: bf16 where XNNPACK stores them so) and the codes chosen on the rounded scales."""
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    weight = weight.detach().to(torch.float32)
    block = (1, group_size or weight.shape[1])
    if rounding == "mse" and bits == 4 and group_size is not None and scale_dtype in (None, torch.bfloat16):
        codes, scale = _mse_int4(weight, group_size)  # bf16 scales: XNNPACK's and linear_q4x4's tiles'
        return IntxUnpackedToInt8Tensor(codes, scale, torch.zeros_like(scale, dtype=torch.int8), torch.int4, block,
                                        torch.float32, "int8_asym_per_token" if dynamic_activations else None)
    quantised = IntxUnpackedToInt8Tensor.from_hp(
        weight, block, getattr(torch, f"int{bits}"),
        mapping_type=MappingType.SYMMETRIC,
        activation_quantization="int8_asym_per_token" if dynamic_activations else None,
        intx_choose_qparams_algorithm="hqq_scale_only" if rounding == "hqq" else "affine",
    )
    if scale_dtype is None and bf16_scales(bits, dynamic_activations):
        scale_dtype = torch.bfloat16
    if scale_dtype is not None:
        quantised = _with_scales_in(quantised, weight, scale_dtype)
    return quantised


# Block scales tried by rounding "mse": max|W| of the block / each divisor (7 puts the extreme on code 7, 8 on -8).
MSE_DIVISORS = tuple(6.0 + 0.0625 * i for i in range(41))  # 6 .. 8.5


def _mse_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit codes (-8..7) and positive bf16 block scales with the least squared rounding error among
    max|W| / MSE_DIVISORS: the calibration's group rounding (exporter/calibration.py GroupRounding) over every
    block at once. Not torchao's choosers (absmax, or HQQ's iterative scale), and not llama.cpp's Q4_0 rule (the
    block's extreme on code -8 through a negative scale): XNNPACK refuses a negative block scale when it loads
    the program."""
    from cpm_mobile.exporter.calibration import GroupRounding

    rows, columns = weight.shape
    rounding = GroupRounding(4, group_size, True, torch.bfloat16, MSE_DIVISORS)
    blocks = weight.reshape(-1, group_size)  # one row per block: params() chooses a scale per row
    scale, zero = rounding.params(blocks)
    codes = rounding.codes(blocks, scale, zero) - zero[:, None]
    return codes.to(torch.int8).reshape(rows, columns), scale.reshape(rows, -1)


def bf16_scales(bits: int, dynamic_activations: bool) -> bool:
    """Whether the .pte stores this weight's scales as bf16: XNNPACK runs every 4-bit linear, per channel
    too, with bf16 scales; 8-bit linears and the weight-only embedding kernels keep fp32."""
    return bits == 4 and dynamic_activations


def _with_scales_in(quantised, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """The same quantisation with its block scales rounded to `dtype` (bf16: what XNNPACK stores) and the codes
    redone to match."""
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, quantize_affine

    scale = quantised.scale.to(dtype).to(torch.float32)
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[quantised.target_dtype]
    codes = quantize_affine(weight, quantised.block_size, scale, quantised.zero_point,
                            output_dtype=torch.int8, quant_min=qmin, quant_max=qmax)
    return type(quantised)(codes, scale, quantised.zero_point, quantised.target_dtype, quantised.block_size,
                           quantised.dtype, quantised.activation_quantization)


def _grid_intx(entry):
    """A checkpoint grid's codes as torchao int4 codes (code - zero: the zero is 2**(bits-1), the grid
    being symmetric); its scales rounded to bf16, what XNNPACK stores (exact for bf16 scales). A mixed grid's
    8-bit entry: int8 codes with its fp16 scales (our weight-only kernel's tiles)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    codes = entry.codes.to(torch.int16) - entry.zeros.to(torch.int16).repeat_interleave(entry.group_size, dim=1)
    wide = entry.bits == 8
    scale = entry.scales.to(torch.float16 if wide else torch.bfloat16).to(torch.float32)
    return IntxUnpackedToInt8Tensor(codes.to(torch.int8), scale, torch.zeros_like(scale, dtype=torch.int8),
                                    torch.int8 if wide else torch.int4, (1, entry.group_size), torch.float32,
                                    "int8_asym_per_token")


def _ternary(weight: torch.Tensor, group_size: Optional[int]):
    """BitCPM-style ternary weights {-1, 0, +1} x (mean |W| of the group), as torchao 4-bit codes.

    No library rounds to ternary (torchao's choose_qparams would spread the codes over all 16
    int4 values), so the rounding is ours: the absmean scale of BitNet b1.58 / BitCPM, rounded to
    bf16 like every XNNPACK block scale, then codes round(W / scale) clipped to [-1, 1].
    """
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    weight = weight.detach().to(torch.float32)
    out_features, in_features = weight.shape
    group = group_size or in_features
    blocks = weight.reshape(out_features, in_features // group, group)
    scale = blocks.abs().mean(dim=-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: codes 0, any scale
    scale = scale.to(torch.bfloat16).to(torch.float32)
    codes = torch.clamp(torch.round(blocks / scale.unsqueeze(-1)), -1, 1).reshape(out_features, in_features)
    return IntxUnpackedToInt8Tensor(codes.to(torch.int8), scale, torch.zeros_like(scale, dtype=torch.int8),
                                    getattr(torch, f"int{TERNARY_CODE_BITS}"), (1, group), torch.float32,
                                    "int8_asym_per_token")


# -- modules ---------------------------------------------------------------------------------------


def _linear(source: nn.Linear, weight) -> nn.Linear:
    linear = nn.Linear(source.in_features, source.out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if source.bias is not None:
        linear.bias = nn.Parameter(source.bias.detach().clone(), requires_grad=False)
    return linear


def grid_weight_only(source: nn.Linear, entry) -> nn.Module:
    """A grid's 8-bit linear (a mixed grid's wide linear, a vision encoder's grid) as our weight-only kernel's
    module: its int8 codes and fp16 scales exactly, fp32 activations."""
    return _weight_only(source, _grid_intx(entry))


def _weight_only(source: nn.Linear, weight) -> nn.Module:
    """Our weight-only kernel's module over a torchao weight's codes and scales, which must already be in the
    dtype the tiles store (fp16 for 8 bits, as Q8_0's; bf16 for 4, as a grid's: WeightOnlyLinear refuses others)."""
    from cpm_mobile.exporter.kernels.weight_only import WeightOnlyLinear

    scales = weight.scale.to(torch.float32).reshape(weight.qdata.shape[0], -1)
    return WeightOnlyLinear(weight.qdata, scales, code_bits(weight), source.bias)


def _embedding(source: nn.Embedding, weight) -> nn.Embedding:
    embedding = _RowsFirstEmbedding(source.num_embeddings, source.embedding_dim, device="meta")
    embedding.weight = nn.Parameter(weight, requires_grad=False)
    return embedding


class _RowsFirstEmbedding(nn.Embedding):
    """A quantised embedding that, run eagerly, dequantises only the rows it gathers.

    torchao's embedding dequantises the whole table on every call (73k x 1024 fp32 at MiniCPM4's size, for
    one token in a decode step): most of a twin's decode time in the check. Dequantising is elementwise
    per group, so the gathered rows are the same floats. Traced (torch.export), the forward is torchao's,
    whose dequantize + embedding pattern ExecuTorch fuses into its embedding kernel."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if torch.compiler.is_compiling() or not hasattr(weight, "qdata"):
            return super().forward(ids)
        from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, dequantize_affine

        rows = ids.reshape(-1)
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[weight.target_dtype]
        zero = weight.zero_point[rows] if weight.zero_point is not None else None
        gathered = dequantize_affine(weight.qdata[rows], weight.block_size, weight.scale[rows], zero, torch.int8,
                                     qmin, qmax, output_dtype=weight.dtype)
        return gathered.reshape(*ids.shape, -1)


# -- description -----------------------------------------------------------------------------------


def describe(scheme: Scheme) -> str:
    """What the twin is, for the report."""
    linears = "ternary {-1,0,+1} x absmean" if scheme.scheme == "ternary" else f"{BITS[scheme.scheme]}-bit symmetric"
    group = f"blocks of {scheme.group_size}" if scheme.group_size else "per channel"
    if weight_only(scheme):
        return (f"eager weight-only variant (cpm_mobile::linear_q{BITS[scheme.scheme]}x4's eager form): fp32 "
                f"activations x {linears} weights ({group}, {scheme.rounding}), embedding {scheme.embedding}, "
                f"lm_head {scheme.lm_head}")
    return (f"eager torchao variant: int8 dynamic activations x {linears} weights ({group}, {scheme.rounding}), "
            f"embedding {scheme.embedding}, lm_head {scheme.lm_head}")


def quantised_weights(model: CausalLM) -> dict[str, object]:
    """Name -> torchao weight tensor of every quantised module of a variant."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    return {name: module.weight for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), IntxUnpackedToInt8Tensor)}


def code_bits(weight) -> int:
    """The width of a torchao intx weight's codes (its target dtype torch.int4 / torch.int8)."""
    return int(str(weight.target_dtype).removeprefix("torch.int"))


def expected_size_bytes(model: CausalLM) -> int:
    """The formula: codes x bits / 8 + scales (bf16 for XNNPACK's 4-bit linears, fp32 otherwise) + unquantised tensors."""
    quantised = quantised_weights(model)
    total = 0
    for name, weight in quantised.items():
        bits = code_bits(weight)
        scale_bytes = 2 if bf16_scales(bits, weight.activation_quantization is not None) else 4
        total += weight.qdata.numel() * bits // 8 + weight.scale.numel() * scale_bytes
    quantised_params = {f"{name}.weight" for name in quantised}
    # remove_duplicate=False: a .pte stores a tied fp32 table twice (the gather's and the lm_head's constant)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name not in quantised_params:
            total += parameter.numel() * parameter.element_size()
    for name, buffer in model.named_buffers():
        if not name.startswith("kv_caches."):  # the caches are mutable: only their shapes are stored
            total += buffer.numel() * buffer.element_size()
    return total
