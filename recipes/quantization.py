"""Quantisation schemes a recipe may ask of each target, typed per target.

Each target's `quantization` field takes one of its own schemes (a union discriminated by
`scheme`), or none; an unknown scheme is a one-line error naming the field.
The quantisers that carry these schemes out live in exporter/quant/.
"""
from __future__ import annotations

from typing import Optional

from cpm_mobile.recipes.quant_executorch import ExecuTorchQuantization as _ExecuTorchSchemes  # noqa: E402
from cpm_mobile.recipes.quant_onnx import OnnxQuantization as _OnnxSchemes  # noqa: E402
from cpm_mobile.recipes.quant_coreml import CoreMLQuantization as _CoreMLSchemes  # noqa: E402

ExecuTorchQuantization = Optional[_ExecuTorchSchemes]
OnnxQuantization = Optional[_OnnxSchemes]
CoreMLQuantization = Optional[_CoreMLSchemes]
