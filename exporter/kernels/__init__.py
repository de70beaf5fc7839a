"""Custom ExecuTorch kernels: the C++ sources, their build, the AOT op definitions and the loader.

- sparse_expert_ffn.cpp: cpm_mobile::sparse_expert_ffn.out, BlockFFN's experts computed from the
  active ones only, read in place (fused_ffn.FusedSparseBlockFFN calls it), and its _int8 / _int4
  overloads over quantised codes of the same weights (fused_ffn.QuantisedFusedSparseBlockFFN);
- build.py: compiles libcpm_mobile_kernels against the executorch wheel (run by pip install -e .);
- ops.py: the torch.library definitions torch.export needs (import it before exporting);
- loader.py: registers the library with ExecuTorch's runtime once per process.
"""

# Kernel (as a .pte's plan names it) -> the library of ours that registers it. An app running a
# .pte that calls one links that library next to ExecuTorch (README: "Custom kernels").
LIBRARY = "libcpm_mobile_kernels"
KERNEL_LIBRARIES = {f"cpm_mobile::{op}.out": LIBRARY
                    for op in ("sparse_expert_ffn", "sparse_expert_ffn_int8", "sparse_expert_ffn_int4")}


def app_kernels(kernels) -> dict[str, list[str]]:
    """The libraries of ours that a program calling `kernels` needs, each with the kernels it provides."""
    needed: dict[str, list[str]] = {}
    for kernel in sorted(kernels):
        if kernel in KERNEL_LIBRARIES:
            needed.setdefault(KERNEL_LIBRARIES[kernel], []).append(kernel)
    return needed
