"""The ONNX target's spec: options and the quantisation schemes it carries (onnxruntime's MatMulNBits / GatherBlockQuantized).

Every linear becomes a MatMulNBits (weights in blocks of `block_size` along the input dimension,
one scale per block, and a zero point per block when asymmetric); the embedding becomes a
GatherBlockQuantized; the lm_head is a MatMulNBits whether tied or not (tied: the embedding gathers
from the lm_head's own codes, one copy in the file). Only pydantic here: this is loaded when a
recipe is parsed. The quantiser is exporter/targets/onnx/quant.py.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from cpm_mobile.exporter.targets.spec import Capabilities, GridCarrier, Strict, TargetSpec

# MatMulNBits and GatherBlockQuantized take power-of-two blocks of at least 16.
BlockSize = Literal[16, 32, 64, 128, 256]
# Bits of the embedding and lm_head: GatherBlockQuantized and MatMulNBits carry 2, 4 and 8;
# None keeps the tensor fp32.
TableBits = Literal[4, 8] | None


class _Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: BlockSize = Field(32, description="weights per scale along the input dimension")
    # 4: the kernel quantises activations to int8 per block (fast on this CPU); 0: fp32 activations.
    accuracy_level: Literal[0, 4] = 4
    embedding_bits: TableBits = 8
    lm_head_bits: TableBits = 8


class OnnxInt8(_Scheme):
    """MatMulNBits bits=8 in blocks (llama.cpp Q8_0's layout; per-channel int8 is not enough on real models).
    Measured (minicpm-tiny, 2048 held-out tokens): KL 2.2e-4, the same as llama.cpp's Q8_0 with its
    q8_0 activation rounding (2.3e-4); accuracy_level 0 would reach Q8_0's weight-only 8e-5 but
    decodes ~6x slower here."""

    scheme: Literal["int8"]
    symmetric: bool = True


class OnnxInt4(_Scheme):
    """MatMulNBits bits=4. algorithm: rtn (onnxruntime's default block rounding) or hqq (its HQQ
    quantiser: optimised float zero points, body linears only; embedding/lm_head stay rtn).
    Defaults by KL on minicpm-tiny (Q4_0: 2.3e-2): asymmetric 32 with 8-bit tables 4.5e-3;
    symmetric 5.1e-3; blocks of 16 3.4e-3 (+14 % size); hqq 3.9e-3 (+6 % size: fp32 zero points);
    4-bit embedding/lm_head 2.0e-2."""

    scheme: Literal["int4"]
    symmetric: bool = False
    algorithm: Literal["rtn", "hqq"] = "rtn"


class OnnxTernary(_Scheme):
    """BitCPM-style {-1, 0, +1} x (mean |W| of the block), carried as 2-bit MatMulNBits codes.
    The rounding is ours: no onnxruntime tool quantises to ternary."""

    scheme: Literal["ternary"]
    block_size: Literal[32, 64, 128, 256] = 32  # 2-bit int8-activation kernels need blocks >= 32


OnnxQuantization = Annotated[Union[OnnxInt8, OnnxInt4, OnnxTernary], Field(discriminator="scheme")]


class OnnxOptions(Strict):
    opset: int = Field(20, ge=20, le=23)
    # Weights go to model.onnx.data above 1 GiB by default. protobuf cannot serialise a message over 2 GiB, and
    # the graph, names and per-tensor overhead ride on top of the weights, so the limit must sit well below
    # 2 GiB. Below 1 GiB one file is simpler to ship and every consumer (netron, onnx.checker, onnx.load)
    # handles it; above, external data also lets ORT memory-map the weights (tensors over 1 MiB are 64
    # KiB-aligned for that) instead of holding a parsed protobuf copy during load.
    external_data_threshold_bytes: int = Field(1 << 30, ge=0)
    pad_mla_values: bool = Field(True, description="zero-pad MLA value heads to the key width (onnxruntime-genai needs it)")


class OnnxSpec(TargetSpec):
    target: Literal["onnx"] = "onnx"
    precision: Literal["fp32", "fp16"] = "fp32"
    options: OnnxOptions = OnnxOptions()
    quantization: OnnxQuantization | None = None


SPEC = OnnxSpec
CAPABILITIES = Capabilities(
    tokenizer_client="onnxruntime-genai",
    sparse_experts="gather",  # SparseBlockFFN's gathers (Gather / GatherBlockQuantized), weights not transposed
    grid=GridCarrier(
        kernel="MatMulNBits",
        scheme_bits={"int8": 8, "int4": 4, "ternary": 2},
        group_field="block_size",
        block_sizes=(16, 32, 64, 128, 256),
        min_ternary_block=32,
        rerounding_fields={"algorithm": "rtn"},
        fp16_scales_exact=True,
        wide_bits=(8,),  # a mixed grid's 8-bit linears (recipe int4-mixed)
    ),
)

SCHEME_BITS = {"int8": 8, "int4": 4, "ternary": 2}  # code width of each scheme in MatMulNBits
