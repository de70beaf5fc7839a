"""Core ML target: CausalLM -> model.mlpackage, an ML Program for iOS 18 / macOS 15 with the KV cache as states.

One function, `main(tokens int32[1, T], input_pos int32[1]) -> logits float32[1, T, V]`, serves both
prefill (T > 1) and decode (T = 1); the keys and values live in fp16 Core ML states (one pair per
layer, [1, heads, max_seq_len, dim]) written with `slice_update` at `input_pos`.

Choices:
- One function, not prefill/decode functions: the weights and the states are declared once, an
  app makes one `MLState` and calls one function for every step, and the I/O contract matches the
  other targets' `forward(tokens, input_pos)`. Two functions would only pay off on the Neural
  Engine, which wants fixed shapes per function; a decode function is the same graph with T = 1.
- T is a flexible `RangeDim(1, max_seq_len)`, not `EnumeratedShapes`: a prompt of any length is
  prefilled as it is, with no padding (padded rows would be written into the cache and computed
  for nothing) and no choice of buckets; CPU and GPU run flexible shapes natively. Enumerated
  shapes would mainly help the Neural Engine, which is not what this artifact is checked on.
- Integer inputs are int32: Core ML has no int64 model inputs (vocab and positions fit easily).
- The module is captured with torch.export (strict=False, dynamic T) and converted with
  `ct.convert(exported_program)`; mutated buffers become states. `index_copy_`, which the
  reference cache uses, has no Core ML conversion, so `CoreMLKVCache` (a slice update at
  input_pos) is swapped into a copy of the module that shares the caller's weights.
- Gather indices: coremltools' `add_int16_cast` pass narrows gather indices to (u)int16 in fp16
  programs, but (in coremltools 9.0) not for a gather over an axis longer than int16's range, so
  the embedding lookup over a vocabulary of 73448 keeps int32 indices; `structural_checks`
  verifies every gather of the saved program so a change of that rule cannot go unnoticed.
- Compute precision from `spec.precision`: the fp32 module is traced, coremltools stores fp16
  weights and computes in fp16 for "fp16". Logits are returned as float32 either way.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import Dim, ExportedProgram

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.base import (
    ArtifactInfo, ExportContext, ExportedArtifact, Progress, StructuralFault, check_model_dtype, exported_with_twin,
    no_progress, refusals_of,
)
from cpm_mobile.exporter.targets.coreml.spec import CoreMLSpec
from cpm_mobile.exporter.targets.coreml.package import (
    FUNCTION, INPUT_POS, LOGITS, SEQ, TOKENS, coreml_ready, io_contract, package_size,  # noqa: F401 (tests)
    save_package,
)

PACKAGE_NAME = "model.mlpackage"


class CoreMLTarget:
    """The spec's options: deployment_target ("iOS18", the only one with states)."""

    name = "coreml"
    multimodal_quantised = False  # its multimodal packages are float so far

    def export(
        self, model: CausalLM, out_dir: Path, spec: CoreMLSpec | None = None,
        context: ExportContext = ExportContext(None, ()), progress: Progress = no_progress,
    ) -> ExportedArtifact:
        spec = spec or CoreMLSpec.model_construct()
        check_model_dtype(model, self.name)  # coremltools casts an fp32 graph to fp16 itself
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

        if spec.quantization is not None:
            from cpm_mobile.exporter.targets.coreml import quant

            quant.check_scheme(model, spec.quantization)  # before any work
        progress("torch.export with dynamic sequence length", 0.0)
        program = capture(coreml_ready(model), model.max_seq_len)
        progress("ct.convert to an ML Program", 0.3)
        mlmodel = convert(program, model.max_seq_len, spec)
        compression = None
        if spec.quantization is not None:
            progress(f"coremltools.optimize: {spec.quantization.scheme}", 0.5)
            mlmodel = quant.compress_mlmodel(mlmodel, spec.quantization, model.config.weight_grid)
            compression = quant.compression_metadata(mlmodel, spec.quantization, model, spec.precision)
        describe(mlmodel, model, context, spec)
        progress(f"save: {PACKAGE_NAME}", 0.8)
        size = save_package(mlmodel, out_dir / PACKAGE_NAME)
        progress("done", 1.0)
        info = ArtifactInfo(
            target=self.name,
            files=[PACKAGE_NAME],
            entry=PACKAGE_NAME,
            io=io_contract(mlmodel, model),
            metadata={**artifact_metadata(mlmodel, spec, size), **({"compression": compression} if compression else {})},
        )
        return exported_with_twin(self, model, spec, out_dir, info)

    def export_multimodal(self, model: CausalLM, vision, out_dir: Path, spec: CoreMLSpec, context: ExportContext,
                          max_side: int, vision_grid=None) -> dict[str, Any]:
        """A vision-language model as three ML Programs (multimodal.py); float only so far (vision_grid None:
        export refuses a quantising recipe for Core ML before any work)."""
        from cpm_mobile.exporter.targets.coreml.multimodal import export_multimodal

        if vision_grid is not None:
            raise ValueError("vision-language Core ML export is unquantised so far")
        return export_multimodal(model, vision, Path(out_dir), spec, max_side)

    def validate(self, model: CausalLM, spec: CoreMLSpec) -> list[str]:
        if spec.quantization is None:
            return []
        from cpm_mobile.exporter.targets.coreml import quant

        return refusals_of(lambda: quant.check_scheme(model, spec.quantization))

    def twin(self, model: CausalLM, spec: CoreMLSpec, bundle_dir: Path, artifact: dict[str, Any]) -> tuple[CausalLM, str]:
        """The model with Core ML's fp16 KV states: what an fp32 program computes exactly (an fp16
        program also rounds every op, which no eager module reproduces; its gate is on KL). A
        compressed program's weights are read back from the saved package (every constexpr op
        materialised as coremltools does), so export and `check` hold it to the same twin."""
        if spec.quantization is None:
            return coreml_ready(model), "eager model with fp16 KV cache"
        from cpm_mobile.exporter.targets.coreml import quant
        from cpm_mobile.runtimes.coreml.mil_interpreter import load_mil_program

        try:
            twin = quant.coreml_twin(model, load_mil_program(Path(bundle_dir) / artifact["entry"]))
        except ValueError as error:  # a constant that holds no parameter of the model
            raise StructuralFault(f"stored_weights: {error}") from None
        return twin, f"eager model with the program's dequantised {spec.quantization.scheme} weights, fp16 KV cache"

    def structure(self, bundle_dir: Path, artifact: dict[str, Any], twin: CausalLM) -> list[str]:
        from cpm_mobile.exporter.targets.coreml.structure import failed, structural_checks

        path = Path(bundle_dir) / artifact["entry"]
        return failed(structural_checks(path, int(artifact["io"]["vocab_size"]),
                                        compression=artifact.get("metadata", {}).get("compression")))


# -- steps ---------------------------------------------------------------------------------------


def capture(module: CausalLM, max_seq_len: int) -> ExportedProgram:
    """torch.export with a dynamic token count T in 1..max_seq_len, decomposed to core ATen."""
    tokens = torch.zeros(1, min(2, max_seq_len), dtype=torch.int64)
    input_pos = torch.zeros(1, dtype=torch.int64)
    seq = Dim(SEQ, min=1, max=max_seq_len)
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        program = torch.export.export(module, (tokens, input_pos), dynamic_shapes=({1: seq}, None), strict=False)
    return program.run_decompositions({})


def convert(program: ExportedProgram, max_seq_len: int, spec: CoreMLSpec):
    import coremltools as ct

    from cpm_mobile.exporter.targets.coreml.linear_state import register_converter

    register_converter()
    inputs = [
        ct.TensorType(name=TOKENS, shape=(1, ct.RangeDim(1, max_seq_len, default=1, symbol=SEQ)), dtype=np.int32),
        ct.TensorType(name=INPUT_POS, shape=(1,), dtype=np.int32),
    ]
    with warnings.catch_warnings():
        # Buffer names become state names with '_' for '.'; io_contract lists the names used.
        warnings.filterwarnings("ignore", message=r"Input, 'kv_caches\.", category=UserWarning)
        return ct.convert(
            program,
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, spec.options.deployment_target),
            compute_precision={"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}[spec.precision],
            inputs=inputs,
            outputs=[ct.TensorType(name=LOGITS, dtype=np.float32)],
            skip_model_load=True,  # Core ML cannot compile it off macOS; the check loads the saved package
        )


def describe(mlmodel, model: CausalLM, context: ExportContext, spec: CoreMLSpec) -> None:
    """What an app needs to drive the model, in the package's own metadata."""
    mlmodel.short_description = f"{model.config.family} causal LM: logits for tokens at input_pos, KV cache in states"
    mlmodel.input_description[TOKENS] = f"token ids [1, T], T in 1..{model.max_seq_len}"
    mlmodel.input_description[INPUT_POS] = "position of tokens[0, 0]; input_pos + T <= max_seq_len"
    mlmodel.output_description[LOGITS] = f"next-token logits [1, T, {model.config.vocab_size}]"
    mlmodel.user_defined_metadata.update({
        "max_seq_len": str(model.max_seq_len),
        "vocab_size": str(model.config.vocab_size),
        "bos_id": "" if context.bos_id is None else str(context.bos_id),
        "eos_ids": ",".join(map(str, context.eos_ids)),
        "precision": spec.precision,
    })


# -- description ---------------------------------------------------------------------------------

def artifact_metadata(mlmodel, spec: CoreMLSpec, size: int) -> dict[str, Any]:
    from importlib.metadata import version

    program = mlmodel.get_spec()
    return {
        "format": "mlprogram",
        "deployment_target": spec.options.deployment_target,
        "compute_precision": spec.precision,
        "spec_version": int(program.specificationVersion),
        "opset": program.mlProgram.functions[FUNCTION].opset,
        "functions": list(program.mlProgram.functions),
        "size_bytes": size,
        "coremltools_version": version("coremltools"),
        "converter": "torch.export (strict=False) + ct.convert(ExportedProgram)",
    }


TARGET = CoreMLTarget
