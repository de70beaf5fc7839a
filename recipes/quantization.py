"""Quantisation schemes a recipe may ask of each target, typed per target.

Each target's `quantization` field takes one of its own schemes (a union discriminated by
`scheme`). A target that knows no scheme yet takes none: asking it for one is a one-line error.
The quantisers that carry these schemes out live in exporter/quant/.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Filled in by the quantisation work: e.g. Annotated[Int8Scheme | Int4Scheme, Field(discriminator="scheme")].
ExecuTorchQuantization = None
from recipes.quant_onnx import OnnxQuantization  # noqa: E402
CoreMLQuantization = None
