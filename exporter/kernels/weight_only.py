"""WeightOnlyLinear: a linear over 8- or 4-bit codes with fp32 activations, run by cpm_mobile::linear_q8x4/_q4x4.

The `packed` buffer is what the .pte stores: tiles of 4 rows x 32 input columns, each with its rows'
scales (fp16 for 8 bits, bf16 for 4, one per 32 columns) and codes (ops.pack_tiles). Run eagerly, the
op multiplies by exactly their dequantised values, so the module is its own twin: the program differs
from it only in fp32 summation order, at any depth (no activation rounding to flip).
"""
from __future__ import annotations

import torch
from torch import nn

from cpm_mobile.exporter.kernels import ops


class WeightOnlyLinear(nn.Module):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int, bias: torch.Tensor | None = None):
        """codes: int8 [N, K] (4 bits: values in -8..7); scales [N, K / 32], exactly representable in the
        stored scale dtype (ops.SCALE_DTYPES)."""
        super().__init__()
        if bits not in ops.LINEAR_OPS:
            raise ValueError(f"no weight-only kernel for {bits}-bit codes")
        self.bits = bits
        self.out_features, self.in_features = codes.shape
        self.register_buffer("packed", ops.pack_tiles(bits, codes, scales))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [N, K], scales [N, K / 32]) as stored."""
        return ops.unpack_tiles(self.bits, self.packed, self.out_features)

    def dequantised(self) -> torch.Tensor:
        return ops.tiles_dequantised(self.bits, self.packed, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.linear_tiles(self.bits, x, self.packed, self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, blocks of 32"
