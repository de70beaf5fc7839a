"""The ExecuTorch target's spec: options and the quantisation schemes it carries (pydantic only, no torch here).

What XNNPACK in executorch 1.5.1 runs, measured on this machine, decides what is allowed:
- linears: int8 dynamic per-token activations x symmetric weights, 8-bit only per output channel
  ("Only 4b group quantization is supported" for 8-bit blocks), 4-bit per channel or in blocks;
  block scales are stored as bf16 by ExecuTorch's XNNPACK serialiser;
- asymmetric weights (a zero point) are delegated but the zero point is ignored: silently wrong
  output (SQNR 18 dB against the eager module), so there is no asymmetric option;
- embeddings run outside XNNPACK in ExecuTorch's quantized_decomposed::embedding_{byte,4bit} kernels.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cpm_mobile.exporter.targets.spec import Capabilities, GridCarrier, Strict, TargetSpec

XNNPACK_BLOCK = 32  # XNNPACK's blockwise 4-bit kernels take blocks in multiples of 32 input channels
EMBEDDING_FORMATS = ("int8", "int4", "fp32")


class _Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rounding: Literal["rtn", "hqq"] = Field(
        "rtn", description="rtn: round to nearest with scale = max|W| / qmax; hqq: torchao's HQQ scale search "
                           "(hqq_scale_only), which lowers the weight error at the same bits")


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
    """8da8w: int8 per-token dynamic activations, int8 weights with one scale per output channel."""

    scheme: Literal["int8"]
    group_size: Optional[int] = Field(None, description="must be null: XNNPACK runs 8-bit weights per channel only")
    embedding: Literal["int8", "fp32"] = "int8"
    lm_head: Literal["int8", "fp32"] = "int8"

    @field_validator("group_size")
    @classmethod
    def _per_channel_only(cls, value: Optional[int]) -> Optional[int]:
        if value is not None:
            raise ValueError("XNNPACK runs 8-bit weights only per output channel: group_size must be null "
                             "(use scheme int4 for blocks)")
        return value


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
    """8da4w: int8 per-token dynamic activations, symmetric int4 weights in blocks along the input dim."""

    scheme: Literal["int4"]
    # Defaults chosen by KL on the embedded minicpm-tiny (2555 held-out tokens): 4-bit everywhere with
    # round-to-nearest 0.030, HQQ 0.024, + 8-bit lm_head 0.011, + 8-bit embedding 0.006.
    rounding: Literal["rtn", "hqq"] = "hqq"


class TernaryScheme(_BlockScheme):
    """BitCPM-style {-1, 0, +1} x one scale per group (mean |W| of the group), run as 4-bit codes by XNNPACK."""

    scheme: Literal["ternary"]
    rounding: Literal["absmean"] = Field("absmean", description="the only ternary rounding: BitCPM's absmean")


ExecuTorchQuantization = Annotated[Union[Int8Scheme, Int4Scheme, TernaryScheme], Field(discriminator="scheme")]


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
    ),
)
