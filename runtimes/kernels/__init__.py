"""Our ExecuTorch kernel library, as an app links it: the C++ sources, their build and the loader.

- sparse_expert_ffn.cpp: cpm_mobile::sparse_expert_ffn.out, BlockFFN's experts computed from the
  active ones only, read in place, and its _int8 / _int4 overloads over quantised codes of the same
  weights (the export side, exporter/kernels/, defines the ops for torch.export and their eager form);
- linear_weight_only.cpp: cpm_mobile::linear_q8x4.out / linear_q4x4.out, linears over 8- or 4-bit weights
  (tiles of 4 rows x 32 columns) with fp32 activations: XNNPACK rounds a quantised linear's activations
  to int8;
- gated_delta_rule.cpp: cpm_mobile::gated_delta_rule.out, the recurrence of Qwen3.5's linear-attention
  layers over T tokens from a state (prefill and decode through one graph);
- build.py: compiles libcpm_mobile_kernels against the executorch wheel (run by pip install);
- loader.py: registers the library with ExecuTorch's runtime once per process.
"""

# Kernel (as a .pte's plan names it) -> the library of ours that registers it. An app running a
# .pte that calls one links that library next to ExecuTorch (README: "Custom kernels").
LIBRARY = "libcpm_mobile_kernels"
KERNEL_LIBRARIES = {f"cpm_mobile::{op}.out": LIBRARY
                    for op in ("sparse_expert_ffn", "sparse_expert_ffn_int8", "sparse_expert_ffn_int4",
                               "linear_q8x4", "linear_q4x4", "gated_delta_rule")}
