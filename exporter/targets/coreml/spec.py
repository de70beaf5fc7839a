"""The Core ML target's spec: options and the quantisation schemes it carries (coremltools.optimize.coreml).

Loaded when a recipe is parsed: pydantic and typing only. exporter/targets/coreml/quant.py carries them out.

- int8 / int4: linear_quantize_weights. group_size = block of input columns sharing one scale
  (iOS18 per_block); None = one scale per output channel (per_channel).
- palette4 / palette2: palettize_weights, granularity per_grouped_channel: group_size output
  channels share one look-up table of 2**bits entries (k-means or uniform).
- ternary: BitCPM-style {-1, 0, +1} x one scale per group of group_size output channels, scale =
  mean |W| of the group; carried exactly as a 2-bit palette per grouped channel (entries -s, 0, +s).
  The ternary rounding is ours (no library does it); coremltools stores it (palettize_weights,
  mode "custom").

embedding / lm_head: "scheme" quantises them like every other weight, "int8" stores them as int8
(blocks of embedding_group_size input columns), "keep" leaves them at the program's precision.
A tied embedding is one constant in the program (read by the gather and by the lm_head's linear),
so for a tied model both fields must agree; that is checked against the model by the quantiser.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from cpm_mobile.exporter.targets.spec import Capabilities, GridCarrier, Strict, TargetSpec

EmbeddingChoice = Literal["scheme", "int8", "keep"]
PALETTE_MODES = ("kmeans", "uniform")


class _Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding: EmbeddingChoice = "int8"
    lm_head: EmbeddingChoice = "int8"
    embedding_group_size: int | None = Field(32, ge=1, description="block of input columns for 'int8' "
                                                                    "embedding / lm_head; None = per channel")


class CoreMLInt8(_Scheme):
    scheme: Literal["int8"]
    group_size: int | None = Field(32, ge=1, description="input columns per scale; None = per output channel")
    symmetric: bool = False
    embedding: EmbeddingChoice = "scheme"
    lm_head: EmbeddingChoice = "scheme"


class CoreMLInt4(_Scheme):
    scheme: Literal["int4"]
    group_size: int | None = Field(32, ge=1, description="input columns per scale; None = per output channel")
    symmetric: bool = False


class _Palette(_Scheme):
    # coremltools' enable_per_channel_scale is not offered: with per_grouped_channel it scales per
    # input column and stores one palette per (group, column), 2.4x the size of the plain palette
    # (measured on minicpm-tiny) for no better KL.
    group_size: int = Field(16, ge=1, description="output channels sharing one look-up table")
    mode: Literal["kmeans", "uniform"] = "kmeans"


class CoreMLPalette4(_Palette):
    scheme: Literal["palette4"]


class CoreMLPalette2(_Palette):
    # 2 bits: one 4-entry table per output channel, uniform (asymmetric int2 per row). Measured on
    # minicpm-tiny: uniform g1 KL 0.23 < uniform g4 0.34 < k-means g16 0.38 < uniform g16 0.45; k-means
    # per channel would take ~6k scikit-learn fits (tens of minutes here) for a 2M-parameter model.
    scheme: Literal["palette2"]
    group_size: int = Field(1, ge=1, description="output channels sharing one look-up table")
    mode: Literal["kmeans", "uniform"] = "uniform"


class CoreMLTernary(_Scheme):
    scheme: Literal["ternary"]
    group_size: int = Field(1, ge=1, description="output channels sharing one scale (mean |W| of the group)")
    carrier: Literal["palette2"] = "palette2"


CoreMLQuantization = Annotated[
    Union[CoreMLInt8, CoreMLInt4, CoreMLPalette4, CoreMLPalette2, CoreMLTernary],
    Field(discriminator="scheme"),
]

SCHEME_BITS = {"int8": 8, "int4": 4, "palette4": 4, "palette2": 2, "ternary": 2}


class CoreMLOptions(Strict):
    deployment_target: Literal["iOS18"] = Field("iOS18", description="Core ML states need iOS18")


class CoreMLSpec(TargetSpec):
    target: Literal["coreml"] = "coreml"
    precision: Literal["fp32", "fp16"] = "fp32"
    options: CoreMLOptions = CoreMLOptions()
    quantization: CoreMLQuantization | None = None


SPEC = CoreMLSpec
CAPABILITIES = Capabilities(
    tokenizer_client_refusal="Core ML has no stock tokenizer client: the app brings its own (tokenizer.json or "
                             "tokenizer.model)",
    sparse_experts=None,
    sparse_experts_refusal=(
        "coremltools 9.0 converts its data-dependent gathers (non_zero), but such a package cannot be "
        "checked (off macOS the MIL interpreter has no non_zero) and Core ML's handling of them on device "
        "is untested; export Core ML without the pass"
    ),
    grid=GridCarrier(
        kernel="Core ML",
        scheme_bits={"int8": 8, "int4": 4},
        refused_schemes={s: "the checkpoint's weights are already on a grid ({grid}); a palette would cluster them "
                            "again: use int4 (it carries 4-bit and ternary grids exactly)"
                         for s in ("palette4", "palette2", "ternary")},
        covers_all_linears=False,
        wide_bits=(8,),  # a mixed grid's 8-bit linears (recipe int4-mixed)
    ),
)
