"""The ExecuTorch target's spec: options and the quantisation schemes it carries (pydantic only, no torch here).

What XNNPACK in executorch 1.5.1 runs, measured on this machine, decides what is allowed (`activations: int8`):
- linears: int8 dynamic per-token activations x symmetric weights, 8-bit only per output channel
  ("Only 4b group quantization is supported" for 8-bit blocks), 4-bit per channel or in blocks;
  block scales are stored as bf16 by ExecuTorch's XNNPACK serialiser;
- asymmetric weights (a zero point) are delegated but the zero point is ignored: silently wrong
  output (SQNR 18 dB against the eager module), so there is no asymmetric option;
- embeddings run outside XNNPACK in ExecuTorch's quantized_decomposed::embedding_{byte,4bit} kernels.
With `activations: fp32` the linears run in our weight-only kernels instead (cpm_mobile::linear_q8x4 /
linear_q4x4, runtimes/kernels/linear_weight_only.cpp): fp32 activations, one scale per 32 input columns
(llama.cpp Q8_0 / Q4_0's grid), fp16 scales for 8 bits (Q8_0's), bf16 for 4.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cpm_mobile.exporter.targets.spec import Capabilities, GridCarrier, Strict, TargetSpec

XNNPACK_BLOCK = 32  # XNNPACK's blockwise 4-bit kernels take blocks in multiples of 32 input channels
WEIGHT_ONLY_BLOCK = 32  # our weight-only kernels' tiles: one scale per 32 input columns
Activations = Literal["int8", "fp32"]
ACTIVATIONS_HELP = ("int8: XNNPACK's integer kernels, activations rounded to int8 per token (fastest prefill); "
                    "fp32: our weight-only kernels, activations kept fp32, blocks of 32 (no activation rounding)")
EMBEDDING_FORMATS = ("int8", "int4", "fp32")


class _Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rounding: Literal["rtn", "hqq", "mse"] = Field(
        "rtn", description="rtn: round to nearest with scale = max|W| / qmax; hqq: torchao's HQQ scale search "
                           "(hqq_scale_only), which lowers the weight error at the same bits; mse (4-bit linears): "
                           "each block's bf16 scale searched for the least squared rounding error (codes -8..7)")


def _check_block(value: Optional[int], field: str) -> Optional[int]:
    if value is not None and (value <= 0 or value % XNNPACK_BLOCK):
        raise ValueError(f"{field} must be null (one scale per output channel) or a positive multiple of "
                         f"{XNNPACK_BLOCK} (XNNPACK's 4-bit blocks), got {value}")
    return value


def _check_embedding_group(value: Optional[int]) -> Optional[int]:
    if value is not None and (value <= 0 or value % 2):
        raise ValueError(f"embedding_group_size must be null (one scale per row) or a positive even number "
                         f"(ExecuTorch's 4-bit embedding packs two codes per byte), got {value}")
    return value


class Int8Scheme(_Scheme):
    """int8 weights. activations int8 (8da8w): XNNPACK, one weight scale per output channel; activations fp32:
    our weight-only kernel, one scale per 32 input columns (Q8_0's grid)."""

    scheme: Literal["int8"]
    activations: Activations = Field("int8", description=ACTIVATIONS_HELP)
    group_size: Optional[int] = Field(None, description="null (per channel) with activations int8: XNNPACK runs "
                                                        "8-bit weights per channel only; 32 with activations fp32")
    embedding: Literal["int8", "fp32"] = "int8"
    lm_head: Literal["int8", "fp32"] = "int8"

    @model_validator(mode="before")
    @classmethod
    def _weight_only_blocks(cls, data):
        if isinstance(data, dict) and data.get("activations") == "fp32" and "group_size" not in data:
            return {**data, "group_size": WEIGHT_ONLY_BLOCK}  # the weight-only kernel's one grid
        return data

    @field_validator("group_size")
    @classmethod
    def _grid(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if info.data.get("activations") == "fp32":
            return _weight_only_block(value)
        if value is not None:
            raise ValueError("XNNPACK runs 8-bit weights only per output channel: group_size must be null "
                             f"(or activations fp32 with group_size {WEIGHT_ONLY_BLOCK}; or scheme int4 for blocks)")
        return value


def _weight_only_block(group_size: Optional[int]) -> Optional[int]:
    if group_size != WEIGHT_ONLY_BLOCK:
        raise ValueError(f"activations fp32 (the weight-only kernels) takes group_size {WEIGHT_ONLY_BLOCK}, got "
                         f"{group_size}")
    return group_size


class _BlockScheme(_Scheme):
    """4-bit codes in blocks along the input dim (int4 and ternary), embedding and lm_head chosen apart."""

    group_size: Optional[int] = Field(32, description="input channels per scale; null = one per output channel")
    embedding: Literal["int8", "int4", "fp32"] = "int8"
    embedding_group_size: Optional[int] = Field(32, description="for a 4-bit embedding; null = one scale per row")
    lm_head: Literal["int8", "int4", "fp32"] = "int8"

    @field_validator("group_size")
    @classmethod
    def _block(cls, value: Optional[int]) -> Optional[int]:
        return _check_block(value, "group_size")

    @field_validator("embedding_group_size")
    @classmethod
    def _embedding_block(cls, value: Optional[int]) -> Optional[int]:
        return _check_embedding_group(value)


class Int4Scheme(_BlockScheme):
    """Symmetric int4 weights in blocks along the input dim. activations int8 (8da4w): XNNPACK with int8
    per-token dynamic activations; fp32: our weight-only kernel (blocks of 32, bf16 scales)."""

    scheme: Literal["int4"]
    activations: Activations = Field("int8", description=ACTIVATIONS_HELP)

    @field_validator("activations")
    @classmethod
    def _grid(cls, value: str, info: ValidationInfo) -> str:
        if value == "fp32":
            _weight_only_block(info.data.get("group_size"))
        return value

    # Defaults chosen by KL on the embedded minicpm-tiny (2555 held-out tokens): 4-bit everywhere with
    # round-to-nearest 0.030, HQQ 0.024, + 8-bit lm_head 0.011, + 8-bit embedding 0.006. mse (the 4-bit
    # linears' block scale searched for the least squared rounding error, exporter/targets/executorch/quant.py):
    # eager, body linears only, 8 x 256 held-out tokens: minicpm-tiny 4.99e-3 vs HQQ 5.54e-3 (llama.cpp Q4_0
    # 4.91e-3); a trained 24-layer model at logit scale 41: 5.80e-3 vs 6.49e-3 (Q4_0 5.30e-3).
    rounding: Literal["rtn", "hqq", "mse"] = "hqq"


class TernaryScheme(_BlockScheme):
    """BitCPM-style {-1, 0, +1} x one scale per group (mean |W| of the group), run as 4-bit codes by XNNPACK."""

    scheme: Literal["ternary"]
    rounding: Literal["absmean"] = Field("absmean", description="the only ternary rounding: BitCPM's absmean")


ExecuTorchQuantization = Annotated[Union[Int8Scheme, Int4Scheme, TernaryScheme], Field(discriminator="scheme")]


def weight_only(scheme: Union[Int8Scheme, Int4Scheme, TernaryScheme]) -> bool:
    """Whether the scheme's linears run in our weight-only kernels (fp32 activations) rather than XNNPACK."""
    return getattr(scheme, "activations", "int8") == "fp32"


class ExecuTorchOptions(Strict):
    backend: Literal["xnnpack"] = "xnnpack"
    attention: Literal["custom_sdpa", "plain"] = Field(
        "custom_sdpa", description="custom_sdpa: ExecuTorch's LLM custom ops; plain: portable kernels only")


class ExecuTorchSpec(TargetSpec):
    target: Literal["executorch"] = "executorch"
    options: ExecuTorchOptions = ExecuTorchOptions()
    quantization: Optional[ExecuTorchQuantization] = None


SPEC = ExecuTorchSpec
CAPABILITIES = Capabilities(
    tokenizer_client="ExecuTorch TextLLMRunner",
    twin_from_spec=True,  # torchao's variant: what XNNPACK's integer kernels compute, per-token int8 activations
    # one custom kernel reads the active experts' rows in place (exporter/kernels)
    sparse_experts="fused_kernel",
    grid=GridCarrier(
        kernel="XNNPACK",
        scheme_bits={"int4": 4, "ternary": 4},
        refused_schemes={"int8": "XNNPACK runs 8-bit weights per output channel only, so the checkpoint's grid "
                                 "({grid}) needs scheme int4"},
        block_multiple=XNNPACK_BLOCK,
        symmetric_only="zero points, which XNNPACK ignores (silently wrong output); only symmetric grids can be "
                       "carried",
        rerounding_fields={"rounding": "rtn"},
        checks_zero_range=False,
        symmetric_field=False,
        wide_bits=(8,),  # a mixed grid's 8-bit linears: our weight-only kernel linear_q8x4 (blocks of 32, fp16 scales)
    ),
)
