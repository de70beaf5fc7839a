"""cpm-mobile: MiniCPM-family and BlockFFN checkpoints to ExecuTorch, ONNX and Core ML, checked against PyTorch.

Installed as one package, `cpm_mobile`, whose subpackages are the repository's top-level folders:
cpm_mobile.exporter (checkpoint -> artifacts), cpm_mobile.runtimes (open and run artifacts),
cpm_mobile.recipes (export recipes as data) and cpm_mobile.cli (the `cpm-mobile` command).
"""
