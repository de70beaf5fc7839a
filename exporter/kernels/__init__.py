"""Custom ExecuTorch kernels: the C++ sources, their build, the AOT op definitions and the loader.

- sparse_expert_ffn.cpp: cpm_mobile::sparse_expert_ffn.out, BlockFFN's experts computed from the
  active ones only, read in place (fused_ffn.FusedSparseBlockFFN calls it);
- build.py: compiles libcpm_mobile_kernels against the executorch wheel (run by pip install -e .);
- ops.py: the torch.library definitions torch.export needs (import it before exporting);
- loader.py: registers the library with ExecuTorch's runtime once per process.
"""
