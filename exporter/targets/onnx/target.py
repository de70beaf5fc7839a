"""ONNX target: the text graph (graph.py), quantised when the recipe asks, saved with its genai_config.json;
a vision-language model's three graphs (multimodal.py)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import onnx_ir as ir
import torch

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.onnx.quant import check_blocks_fit, check_grid, onnx_twin, quantize_onnx
from cpm_mobile.exporter.targets.base import (
    ArtifactInfo, ExportContext, ExportedArtifact, Progress, StructuralFault, check_model_dtype, exported_with_twin,
    no_progress, refusals_of,
)
from cpm_mobile.exporter.targets.onnx.spec import OnnxSpec
from cpm_mobile.exporter.targets.onnx.genai_config import GENAI_CONFIG_FILE, genai_config
from cpm_mobile.exporter.targets.onnx.graph import (
    DATA_FILE, MODEL_FILE, TORCH_DTYPES, CacheLayout, build_onnx, initializer_bytes, io_contract, save_onnx,
)


class OnnxTarget:
    """The spec's options: opset (>= 20), external_data_threshold_bytes, pad_mla_values (default
    true: MLA value heads zero-padded to the key width so onnxruntime-genai can run it)."""

    name = "onnx"
    multimodal_quantised = True  # export_multimodal stores a recipe's LLM grid and vision grid

    def export(
        self, model: CausalLM, out_dir: Path, spec: OnnxSpec | None = None,
        context: ExportContext = ExportContext(None, ()), progress: Progress = no_progress,
    ) -> ExportedArtifact:
        spec = spec or OnnxSpec.model_construct()
        options = spec.options
        out_dir = Path(out_dir)
        check_model_dtype(model, self.name)
        onnx_model, layout = self._graph(model, spec, progress)
        size = initializer_bytes(onnx_model)
        external = size > options.external_data_threshold_bytes
        progress("saving", 0.6)
        out_dir.mkdir(parents=True, exist_ok=True)
        io = io_contract(layout, model.config.vocab_size, model.max_seq_len)
        genai, genai_note = _genai_config(model, context, io)
        staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=out_dir))
        try:
            files = save_onnx(onnx_model, staging, external, progress)
            if genai is not None:
                (staging / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=4) + "\n")
                files.append(GENAI_CONFIG_FILE)
            _move_into(staging, out_dir, files, stale=[DATA_FILE, GENAI_CONFIG_FILE])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        progress("done", 1.0)
        info = ArtifactInfo(
            target=self.name,
            files=files,
            entry=MODEL_FILE,
            io=io,
            metadata={
                "opset": options.opset,
                "precision": spec.precision,
                "external_data": external,
                "external_data_threshold_bytes": options.external_data_threshold_bytes,
                "size_bytes": sum((out_dir / name).stat().st_size for name in files),
                "genai_config": GENAI_CONFIG_FILE if genai is not None else None,
                "genai": genai_note,
                "value_padding": layout.value_dim - layout.model_value_dim,
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                "quantization": spec.quantization.model_dump() if spec.quantization is not None else None,
            },
        )
        return exported_with_twin(self, model, spec, out_dir, info)

    def export_multimodal(self, model: CausalLM, vision, out_dir: Path, spec: OnnxSpec, context: ExportContext,
                          max_side: int, vision_grid=None) -> dict[str, Any]:
        """A vision-language model as onnxruntime-genai's three-model layout (multimodal.py)."""
        from cpm_mobile.exporter.targets.onnx.multimodal import export_multimodal

        if spec.quantization is not None:
            check_grid(model, spec.quantization, spec.precision)
        return export_multimodal(model, vision, Path(out_dir), spec, max_side, vision_grid)

    def validate(self, model: CausalLM, spec: OnnxSpec) -> list[str]:
        if spec.quantization is None:
            return []
        return refusals_of(lambda: check_grid(model, spec.quantization, spec.precision),
                           lambda: check_blocks_fit(model, spec.quantization))

    def _graph(self, model: CausalLM, spec: OnnxSpec, progress: Progress) -> tuple[ir.Model, CacheLayout]:
        """The graph, quantised when the spec asks."""
        converted, _ = self._converted(model, spec)
        layout = CacheLayout.of(converted, TORCH_DTYPES[spec.precision], pad_values=spec.options.pad_mla_values)
        if spec.quantization is not None:
            check_grid(model, spec.quantization, spec.precision)  # the checkpoint's grid, before any work
        progress("exporting graph (torch.export + dynamo)", 0.0)
        onnx_model = build_onnx(converted, layout, spec.options.opset)
        if spec.quantization is None:
            return onnx_model, layout
        progress(f"quantising ({spec.quantization.scheme})", 0.5)
        return quantize_onnx(onnx_model, spec.quantization, model.config.weight_grid), layout

    def twin(self, model: CausalLM, spec: OnnxSpec, bundle_dir: Path, artifact: dict[str, Any]) -> tuple[CausalLM, str]:
        """What the graph computes. Quantised: the weights read back from the stored graph (every
        MatMulNBits' and GatherBlockQuantized's codes, scales and zero points, dequantised), with
        MatMulNBits' int8 activation rounding."""
        converted, description = self._converted(model, spec)
        if spec.quantization is None:
            return converted, description
        try:
            stored = ir.load(Path(bundle_dir) / artifact["entry"])
            embedding = artifact.get("metadata", {}).get("embedding_model")  # a vision-language model's own graph
            if embedding is not None:
                stored = [stored, ir.load(Path(bundle_dir) / embedding)]
            twin = onnx_twin(converted, stored, spec.quantization)
        except ValueError as error:  # a quantised weight missing from the graph, or one it cannot name
            raise StructuralFault(f"stored_quantised: {error}") from None
        return twin, (f"eager model with the graph's dequantised {spec.quantization.scheme} weights"
                      " and MatMulNBits' int8 activation rounding")

    def structure(self, bundle_dir: Path, artifact: dict[str, Any], twin: CausalLM) -> list[str]:
        """Reading the twin back from the graph checks what it stores (see twin()); where its kernels round
        activations, the stored weights are also checked exactly through the fp32 path (exact.py)."""
        if artifact.get("metadata", {}).get("quantization") is not None:
            from cpm_mobile.exporter.targets.onnx.exact import exact_weight_faults

            return exact_weight_faults(ir.load(Path(bundle_dir) / artifact["entry"]), artifact, twin)
        return []

    def _converted(self, model: CausalLM, spec: OnnxSpec) -> tuple[CausalLM, str]:
        """The graph computes the module itself (its past/present wrapper only moves the cache to
        the graph's inputs and outputs), in the spec's precision."""
        if spec.precision == "fp32":
            return model, "eager fp32 model"
        # A converted copy: Module.to() would convert shared parameters in place.
        return copy.deepcopy(model).to(TORCH_DTYPES[spec.precision]), f"eager {spec.precision} model"


def _genai_config(model: CausalLM, context: ExportContext, io: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    cache = io["cache"]
    if "recurrent" in io:
        return None, "not supported: the hybrid (linear-attention) layers' states need genai's qwen3_5_text model type"
    if cache["key_dim"] != cache["stored_value_dim"]:
        return None, (
            f"not supported: onnxruntime-genai sizes key and value caches with one head_size, but keys are "
            f"{cache['key_dim']} wide and values {cache['stored_value_dim']} (MLA); export with pad_mla_values=true"
        )
    config = model.config
    genai = genai_config(
        model_file=MODEL_FILE,
        io=io,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        context_length=model.max_seq_len,
        vocab_size=config.vocab_size,  # the logits' width, which is what genai reads it as
        bos_id=context.bos_id,
        eos_ids=context.eos_ids,
    )
    padded = cache["stored_value_dim"] - cache["value_dim"]
    note = "supported (model.type llama, past_present_share_buffer false)"
    if padded:
        note += f"; value heads zero-padded {cache['value_dim']} -> {cache['stored_value_dim']} to match head_size"
    return genai, note


def _move_into(staging: Path, out_dir: Path, files: Sequence[str], stale: Sequence[str]) -> None:
    """Atomic per file: each name appears complete or not at all. A companion file this export did
    not write (an old model.onnx.data) is removed so it cannot be mistaken for ours."""
    for name in stale:
        if name not in files and (out_dir / name).exists():
            (out_dir / name).unlink()
    # Data first: a model.onnx that is visible always finds its weights.
    for name in sorted(files, key=lambda n: n != DATA_FILE):
        os.replace(staging / name, out_dir / name)


TARGET = OnnxTarget
