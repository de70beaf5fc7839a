"""ExecuTorch target: CausalLM -> model.pte lowered to XNNPACK, ready for ExecuTorch's LLM runner.

One `forward(tokens int64[1, T], input_pos int64[1]) -> logits float32[1, T, V]` method with a
dynamic T in 1..max_seq_len and the KV cache held as mutable buffers (its state persists across
execute calls), plus the constant methods the LLM runner reads (get_max_seq_len, get_eos_ids, ...).

Attention runs through ExecuTorch's LLM custom ops by default (`attention: custom_sdpa`): the same
numbers as the module's own masked attention, but attending only to the filled positions instead of
the whole cache (decode 1.6-2x faster on small models here; MLA included, see executorch_cache.py).
The option `attention: plain` keeps the module's index_copy_ + masked SDPA buffers, which need no
kernels beyond the portable ones.

The steps are small functions so a quantisation step can slot in between them:
    prepare (swap caches) -> capture (torch.export) -> lower (edge + XNNPACK) -> emit -> write.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from cpm_mobile.exporter.kernels import app_kernels
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.base import (
    ArtifactInfo, ExportContext, ExportedArtifact, Progress, check_model_dtype, no_progress, refusals_of,
)
from cpm_mobile.exporter.targets.executorch.program import (  # noqa: F401 (re-exported: the steps' one home)
    ATTENTION_CUSTOM, PTE_NAME, cache_description, constant_methods, emit, export_ready,
    write_program,
)
from cpm_mobile.exporter.targets.executorch.spec import ExecuTorchSpec

METHOD = "forward"


class ExecuTorchTarget:
    name = "executorch"
    multimodal_quantised = True  # export_multimodal stores a recipe's LLM grid and vision grid

    def __init__(self) -> None:
        self._twins: dict[tuple[int, str], tuple[CausalLM, str]] = {}  # the quantised variant, made once per export

    def validate(self, model: CausalLM, spec: ExecuTorchSpec) -> list[str]:
        if spec.quantization is None:
            return []
        from cpm_mobile.exporter.targets.executorch.quant import check_fits
        from cpm_mobile.exporter.targets.executorch.sparse import check_sparse_fits

        return refusals_of(lambda: check_fits(model, spec.quantization),
                           lambda: check_sparse_fits(model, spec.quantization.group_size))

    def export(
        self, model: CausalLM, out_dir: Path, spec: ExecuTorchSpec | None = None,
        context: ExportContext = ExportContext(None, ()), progress: Progress = no_progress,
    ) -> ExportedArtifact:
        spec = spec or ExecuTorchSpec.model_construct()
        check_model_dtype(model, self.name)
        attention = spec.options.attention
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

        variant, _ = self._variant(model, spec)
        progress("export: torch.export with dynamic sequence length", 0.0)
        program = capture(export_ready(variant, attention), model.max_seq_len)
        progress("lower: edge dialect, XNNPACK partitioning", 0.3)
        methods = constant_methods(model, context, attention)
        edge = lower(program, methods)
        progress("to_executorch: memory planning and emission", 0.7)
        executorch_program = emit(edge)
        progress("save: model.pte", 0.9)
        size = write_program(executorch_program, out_dir / PTE_NAME)
        progress("done", 1.0)
        metadata = artifact_metadata(model, spec, methods, size)
        if spec.quantization is not None:
            from cpm_mobile.exporter.targets.executorch.quant import expected_size_bytes

            metadata["expected_size_bytes"] = expected_size_bytes(variant)
        metadata.update(program_contents(executorch_program))
        info = ArtifactInfo(
            target=self.name,
            files=[PTE_NAME],
            entry=PTE_NAME,
            io=io_contract(model, attention),
            metadata=metadata,
        )
        twin, description = self.twin(model, spec, out_dir, asdict(info))
        return ExportedArtifact(info, twin, description)

    def export_multimodal(self, model: CausalLM, vision, out_dir: Path, spec: ExecuTorchSpec, context: ExportContext,
                          max_side: int, vision_grid=None) -> dict[str, Any]:
        """A vision-language model as the one .pte ExecuTorch's MultimodalRunner runs (multimodal.py): the text
        model as the recipe quantises it (the twin's variant), the vision encoder on `vision_grid` if given."""
        from cpm_mobile.exporter.targets.executorch.multimodal import export_multimodal

        variant, _ = self._variant(model, spec)
        return export_multimodal(variant, vision, Path(out_dir), spec, context, max_side, vision_grid)

    def twin(self, model: CausalLM, spec: ExecuTorchSpec, bundle_dir: Path | None = None,
             artifact: dict[str, Any] | None = None) -> tuple[CausalLM, str]:
        """What the .pte computes: the model itself in fp32 (its export caches, custom_sdpa included,
        compute the same attention up to fp32 summation order), or with the recipe's quantisation the
        torchao variant, whose eager run is what XNNPACK's integer kernels compute. The variant is
        rebuilt from the spec (deterministic: the same codes and scales as the program's), not read
        back from the .pte; the structural check holds the file to the size those codes take."""
        return self._variant(model, spec)

    def structure(self, bundle_dir: Path, artifact: dict[str, Any], twin: CausalLM) -> list[str]:
        if artifact.get("metadata", {}).get("quantization") is None:
            return []
        from cpm_mobile.exporter.targets.executorch.exact import stored_weight_faults

        pte = Path(bundle_dir) / artifact["entry"]
        return stored_quantised_faults(twin, pte.stat().st_size) + stored_weight_faults(pte, twin)

    def _variant(self, model: CausalLM, spec: ExecuTorchSpec) -> tuple[CausalLM, str]:
        if spec.quantization is None:
            return model, "eager fp32 model"
        key = (id(model), spec.quantization.model_dump_json())
        if key not in self._twins:
            from cpm_mobile.exporter.targets.executorch.quant import describe, quantize_for_executorch
            from cpm_mobile.exporter.targets.executorch.sparse import describe_sparse

            variant = quantize_for_executorch(model, spec.quantization)
            self._twins[key] = (variant, describe(spec.quantization) + describe_sparse(variant))
        return self._twins[key]


# -- steps ---------------------------------------------------------------------------------------


def capture(module: CausalLM, max_seq_len: int) -> ExportedProgram:
    """torch.export with a dynamic token count T in 1..max_seq_len."""
    tokens = torch.zeros(1, min(2, max_seq_len), dtype=torch.int64)
    input_pos = torch.zeros(1, dtype=torch.int64)
    seq = Dim("T", min=1, max=max_seq_len)
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        return torch.export.export(module, (tokens, input_pos), dynamic_shapes=({1: seq}, None), strict=False)


def lower(program: ExportedProgram, methods: dict[str, Any]):
    """Edge dialect with the XNNPACK-supported subgraphs delegated, and the constant methods attached."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    return to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods=methods,
    )


PROGRAM_BYTES_PER_LAYER = 64 * 1024


def stored_quantised_faults(twin: CausalLM, size: int) -> list[str]:
    """The structural check: a program that stores its weights quantised is within 10 % of codes x bits / 8 +
    scales + unquantised tensors (measured 2.5-3.7 % over, the program's own tables), plus a fixed
    PROGRAM_BYTES_PER_LAYER for the tables themselves (a linear-attention layer's ~40 operators and
    delegates take ~30 KB: 13 % of a 4-layer 0.8 MB test model, nothing at real sizes). A program that
    kept fp32 weights (a lowering that dequantised them) is ~3.5x over; the twin gate alone cannot
    always tell int8 from fp32 (their SQNR differ by a few dB)."""
    from cpm_mobile.exporter.targets.executorch.quant import expected_size_bytes

    expected = expected_size_bytes(twin)
    if size > 1.10 * expected + PROGRAM_BYTES_PER_LAYER * twin.config.num_layers:
        return [f"stored_quantised: {PTE_NAME} holds {size / 1e6:.1f} MB where its quantised weights take "
                f"{expected / 1e6:.1f} MB: the program does not store them quantised"]
    return []


# -- description ---------------------------------------------------------------------------------


def io_contract(model: CausalLM, attention: str) -> dict[str, Any]:
    return {
        "method": METHOD,
        "inputs": [
            {"name": "tokens", "dtype": "int64", "shape": [1, "T"]},
            {"name": "input_pos", "dtype": "int64", "shape": [1], "meaning": "position of tokens[0, 0]"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "T", model.config.vocab_size]}],
        "dynamic_dims": {"T": {"min": 1, "max": model.max_seq_len}},
        "max_seq_len": model.max_seq_len,
        "constraint": "input_pos + T <= max_seq_len",
        "cache": cache_description(model, attention),
        **recurrent_description(model),
    }


def recurrent_description(model: CausalLM) -> dict[str, Any]:
    """Hybrid backbones: the linear-attention layers keep a conv and a recurrent state (mutable buffers,
    reset by a call at input_pos 0) instead of a KV cache; they continue only from their last position."""
    linear = model.config.linear_layers
    if not linear:
        return {}
    state = model.kv_caches[linear[0]]
    return {"recurrent": {"layers": list(linear), "conv_shape": list(state.conv_state.shape),
                          "recurrent_shape": list(state.recurrent_state.shape), "kind": "mutable_buffers",
                          "reset": "input_pos == 0"}}


def program_contents(executorch_program) -> dict[str, Any]:
    """What an app's runtime must provide: the kernels `forward` calls outside delegates, and the delegates."""
    plan = next(p for p in executorch_program.executorch_program.execution_plan if p.name == METHOD)
    kernels = sorted({f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators})
    delegates: dict[str, int] = {}
    for delegate in plan.delegates:
        delegates[delegate.id] = delegates.get(delegate.id, 0) + 1
    # Kernels of ours (exporter/kernels) the app must link, by library: {} for a program without any.
    return {"kernels": kernels, "delegates": delegates, "app_kernels": app_kernels(kernels)}


def artifact_metadata(model: CausalLM, spec: ExecuTorchSpec, methods: dict[str, Any], size: int) -> dict[str, Any]:
    from importlib.metadata import version

    attention = spec.options.attention
    metadata: dict[str, Any] = {
        "backend": spec.options.backend,
        "attention": attention,
        "precision": spec.precision,
        "quantization": spec.quantization.model_dump() if spec.quantization is not None else None,
        "constant_methods": methods,
        "size_bytes": size,
        "executorch_version": version("executorch"),
    }
    padding = model.config.k_head_dim - model.config.value_head_dim
    if attention == ATTENTION_CUSTOM and padding:
        # custom_sdpa needs equal key and value widths (MLA's are not): values are stored zero-padded.
        metadata["value_padding"] = {"from": model.config.value_head_dim, "to": model.config.k_head_dim}
    return metadata


TARGET = ExecuTorchTarget
