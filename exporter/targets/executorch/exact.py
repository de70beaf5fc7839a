"""The exact half of a quantised .pte's check: the weights XNNPACK stores, against the twin's codes and scales.

XNNPACK's int8 dynamic activations make the twin match the program only statistically at depth
(exporter/spread.py calibrates for that drift), so a small weight fault could hide in it. The stored
weights need no statistics: ExecuTorch's XNNPACK serialiser keys every constant it writes by the
sha256 of its bytes (node_visitor.py: 4-bit codes packed two per byte by convert_to_qc4w, 8-bit codes
as int8, per-group scales as bf16 with a "scale_" prefix, per-channel scales fp32). So each of the
twin's quantised linears must find its codes' and scales' digests among the program's keys, and each
stored buffer must still hash to its own key (a changed byte breaks that). Exact at any depth.
The weight-only linears (our kernels, outside XNNPACK) are checked the same way against the program's
own constant tensors.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def _digest(tensor: torch.Tensor) -> str:
    tensor = tensor.contiguous()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _expected_keys(weight: torch.Tensor) -> tuple[str, str] | None:
    """(codes key, scales key) as XNNPACK's serialiser names them; None for a weight it does not hold."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor

    codes, scale, block = getattr(weight, "qdata", None), getattr(weight, "scale", None), getattr(weight, "block_size", None)
    if codes is None or scale is None or block is None or codes.dim() != 2:
        return None
    grouped = block[-1] < codes.shape[-1]
    if int(codes.min()) >= -8 and int(codes.max()) <= 7 and weight.target_dtype != torch.int8:
        codes = NodeVisitor.convert_to_qc4w(codes)
    scales = scale.to(torch.bfloat16) if grouped else scale.reshape(-1).to(torch.float32)
    return _digest(codes), "scale_" + _digest(scales)


def stored_weight_faults(pte: Path, twin: nn.Module) -> list[str]:
    """Linears whose codes or scales the program does not store, and buffers that no longer match their key."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte_file = deserialize_pte_binary(Path(pte).read_bytes())
    faults = _weight_only_faults(pte_file.program, twin)
    named = pte_file.named_data
    if named is None or not named.pte_data:
        return faults[:8]
    keys = set(named.pte_data)
    for key, entry in named.pte_data.items():
        digest = hashlib.sha256(named.buffers[entry.buffer_index]).hexdigest()
        if key.removeprefix("scale_") != digest:
            faults.append(f"stored weights: buffer {key[:16]}... no longer hashes to its key (changed bytes)")
    for name, module in twin.named_modules():
        # Linears only: XNNPACK runs them; the quantised embedding is ExecuTorch's own embedding op, whose
        # table the program stores unkeyed (the size check covers it).
        weight = module.weight if isinstance(module, nn.Linear) else None
        expected = _expected_keys(weight) if isinstance(weight, torch.Tensor) else None
        if expected is None:
            continue
        missing = [part for part, key in zip(("codes", "scales"), expected) if key not in keys]
        if missing:
            faults.append(f"stored weights: {name}'s {' and '.join(missing)} differ from the twin's "
                          f"(not among the program's {len(keys)} XNNPACK constants)")
    return faults[:8]


def _weight_only_faults(program, twin: nn.Module) -> list[str]:
    """Each weight-only linear's packed tiles (codes and scales, exporter/kernels/weight_only.py) must be one of
    the program's constant tensors byte for byte: our kernels read them from the program's constant buffer."""
    from cpm_mobile.exporter.kernels.weight_only import WeightOnlyLinear

    modules = [(name, module) for name, module in twin.named_modules() if isinstance(module, WeightOnlyLinear)]
    if not modules:
        return []
    stored = {hashlib.sha256(buffer.storage).hexdigest() for buffer in program.constant_buffer}
    return [f"stored weights: {name}'s codes and scales differ from the twin's (not among the program's "
            f"{len(stored)} constant tensors)"
            for name, module in modules if _digest(module.packed) not in stored]
