"""The export side of our custom ExecuTorch kernels (the library itself: runtimes/kernels/).

- ops.py: the torch.library definitions torch.export needs (import it before exporting), with their eager form;
- fused_ffn.py: the modules that call them (FusedSparseBlockFFN, QuantisedFusedSparseBlockFFN).
"""
from cpm_mobile.runtimes.kernels import KERNEL_LIBRARIES, LIBRARY

__all__ = ["KERNEL_LIBRARIES", "LIBRARY", "app_kernels"]


def app_kernels(kernels) -> dict[str, list[str]]:
    """The libraries of ours that a program calling `kernels` needs, each with the kernels it provides."""
    needed: dict[str, list[str]] = {}
    for kernel in sorted(kernels):
        if kernel in KERNEL_LIBRARIES:
            needed.setdefault(KERNEL_LIBRARIES[kernel], []).append(kernel)
    return needed
