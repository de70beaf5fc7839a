"""The .pte's size predicted from the shapes: tensors as exporter/targets/executorch/quant.py's plan stores them.

Linears: codes at the scheme's bits (ternary: 4-bit codes, the narrowest XNNPACK runs); 4-bit block scales
bf16 (XNNPACK's serialiser), 8-bit per-channel scales fp32. Embedding: ExecuTorch's embedding_byte /
embedding_4bit tables with fp32 scales. A tied embedding is two tensors in a .pte (the gather's and the
lm_head's), quantised or not. A program's own tables are 2.5-3.5 % of the embedded models' (measured
65-76 KB at 4 layers) and left out.
"""
from __future__ import annotations

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.executorch.spec import ExecuTorchSpec, weight_only
from cpm_mobile.exporter.targets.stored import (
    BF16, EMBEDDING, FP32, LM_HEAD, Stored, expert_tables, float_tensor, grid_width, matrices, rest,
)


def stored_bytes(model: CausalLM, spec: ExecuTorchSpec) -> int:
    return sum(t.bytes for t in pte_tensors(model, spec))


def pte_tensors(model: CausalLM, spec: ExecuTorchSpec) -> list[Stored]:
    """The tensors of the .pte, as exporter/targets/executorch/quant.py's plan quantises them."""
    scheme = spec.quantization
    stored = []
    for name, module in matrices(model):  # the tied lm_head is its own tensor here: stored twice
        if scheme is None:
            stored.append(float_tensor(name, module, 32))
            continue
        if name == EMBEDDING:
            choice = scheme.embedding
        elif name == LM_HEAD:
            choice = scheme.lm_head
        else:
            choice = scheme.scheme
        if choice == "fp32":
            stored.append(float_tensor(name, module, 32))
            continue
        rows, columns = module.weight.shape
        if grid_width(model, name) == 8:  # a mixed grid's 8-bit linear: our weight-only kernel's tiles
            stored.append(_pte_codes(name, rows, columns, "int8", 32, False, weight_only=True))
            continue
        # The embedding runs in weight-only kernels (its own group size); every linear in XNNPACK.
        group = getattr(scheme, "embedding_group_size", None) if name == EMBEDDING else scheme.group_size
        stored.append(_pte_codes(name, rows, columns, choice, group, dynamic_activations=name != EMBEDDING,
                                 weight_only=name != EMBEDDING and weight_only(scheme)))
    if scheme is not None:  # expert rows [units, H], quantised by the dense quantiser's own builders
        hidden = model.config.hidden_size
        for name, table in expert_tables(model):
            stored.append(_pte_codes(name, table.numel() // hidden, hidden, scheme.scheme, scheme.group_size, True))
    return stored + rest(model, 32, quantised_tables=scheme is not None)


def _pte_codes(name: str, rows: int, columns: int, choice: str, group: int | None, dynamic_activations: bool,
               weight_only: bool = False) -> Stored:
    """A [rows, columns] weight as torchao codes: 4-bit in groups along columns, 8-bit one scale per row
    (XNNPACK) or per 32 columns (the weight-only kernel's tiles: 16-bit scales, rows padded to a multiple of 4)."""
    from cpm_mobile.exporter.kernels.ops import TILE_BLOCK, TILE_ROWS, scale_bytes
    from cpm_mobile.exporter.targets.executorch.quant import BITS, TERNARY_CODE_BITS, bf16_scales

    bits = TERNARY_CODE_BITS if choice == "ternary" else BITS[choice]
    if weight_only:
        rows = -(-rows // TILE_ROWS) * TILE_ROWS
        return Stored(name, rows * columns, bits, rows * (columns // TILE_BLOCK), scale_bytes(bits))
    group = group if bits == 4 else None
    scale_bytes = BF16 if bf16_scales(bits, dynamic_activations) else FP32
    return Stored(name, rows * columns, bits, rows * (columns // (group or columns)), scale_bytes)
