"""The .mlpackage's size predicted from the shapes.

weight.bin's payload (exporter/targets/coreml/quant.py's formula for a compressed program:
constexpr_blockwise_shift_scale codes with scales (and offsets) in the program's precision, palettes'
LUTs; a tied table is one constant), plus model.mlmodel (the program, 19-21 KB a layer, 12 KB fixed)
and weight.bin's blob headers and alignment (~20 KB), fitted to exports of minicpm-tiny's shape.
"""
from __future__ import annotations

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.coreml.spec import CoreMLSpec
from cpm_mobile.exporter.targets.stored import FLOAT_BYTES, LM_HEAD, float_tensor, matrices, rest

PACKAGE_BYTES, PACKAGE_BYTES_PER_LAYER = 32_000, 20_000


def stored_bytes(model: CausalLM, spec: CoreMLSpec) -> int:
    return coreml_weight_bytes(model, spec) + PACKAGE_BYTES + PACKAGE_BYTES_PER_LAYER * model.config.num_layers


def coreml_weight_bytes(model: CausalLM, spec: CoreMLSpec) -> int:
    """weight.bin's payload: exporter/targets/coreml/quant.py's formula for a compressed program, else every
    tensor (a tied table once) in the program's precision."""
    if spec.quantization is not None:
        from cpm_mobile.exporter.targets.coreml.quant import expected_weight_bytes

        return expected_weight_bytes(model, spec.quantization, spec.precision)
    bits = 8 * FLOAT_BYTES[spec.precision]
    tensors = [float_tensor(n, m, bits) for n, m in matrices(model) if not (n == LM_HEAD and model.tied)]
    return sum(t.bytes for t in tensors + rest(model, bits))
