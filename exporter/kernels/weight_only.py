"""WeightOnlyLinear: a linear over 8- or 4-bit codes with fp32 activations, run by cpm_mobile::linear_q8x4/_q4x4.

The `packed` buffer is what the .pte stores: tiles of 4 rows x 32 input columns, each with its rows'
scales (fp16 for 8 bits, bf16 for 4, one per 32 columns) and codes (ops.pack_tiles). Run eagerly, the
op multiplies by exactly their dequantised values, so the module is its own twin: the program differs
from it only in fp32 summation order, at any depth (no activation rounding to flip). Run eagerly, the module
computes the op's eager form (ops._linear_impls) with the weight unpacked once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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
        if torch.compiler.is_exporting():  # the program calls the kernel
            out = ops.linear_tiles(self.bits, x, self.packed, self.out_features)
        else:  # the twin: the op's eager form, its weight unpacked once rather than on every call
            out = F.linear(x, self._weight())
        return out if self.bias is None else out + self.bias

    def _weight(self) -> torch.Tensor:
        """The dequantised weight, kept while `packed` is unchanged (a check runs the twin hundreds of times:
        unpacking the tiles costs 25-50x the matmul of one decode step). Costs an fp32 copy of the weight."""
        key = (self.packed.data_ptr(), self.packed._version)
        if getattr(self, "_cached", (None, None))[0] != key:
            self._cached = (key, self.dequantised())
        return self._cached[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, blocks of 32"
