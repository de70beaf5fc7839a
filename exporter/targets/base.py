"""What every target (executorch, onnx, coreml) takes and returns.

A target turns an export-ready CausalLM into artifact files inside a folder it is given, and
describes them: which files, and the I/O contract a runtime (ours or the app's) needs. With the
artifact it returns its twin: the eager module the artifact is meant to reproduce exactly (its
own KV cache form, the weights it really stores, the sparse form it was given), so the check can
hold the artifact to a tight bound against what it should compute and, separately, measure what
the recipe costs against the fp32 reference. A target knows nothing of the checkpoint's layout,
imports no pass, and never writes outside `out_dir`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.transformer import CausalLM

# progress(description, fraction_done or None)
Progress = Callable[[str, float | None], None]


def no_progress(description: str, fraction: float | None = None) -> None:
    return None


@dataclass
class ArtifactInfo:
    target: str  # "executorch" | "onnx" | "coreml"
    files: list[str]  # paths relative to the bundle folder, e.g. ["model.pte"]
    entry: str  # the file (or package folder) a runtime opens, e.g. "model.pte"
    io: dict[str, Any]  # the I/O contract: input/output names, dtypes, shapes, cache layout
    metadata: dict[str, Any] = field(default_factory=dict)  # precision, backend, opset, sizes...


@dataclass
class ExportedArtifact:
    info: ArtifactInfo
    twin: nn.Module  # eager module with the CausalLM contract; what the artifact should compute
    twin_description: str  # what the twin is, for the report: "fp32 model", "fp16 KV cache", ...


@dataclass(frozen=True)
class ExportContext:
    """Facts about the checkpoint a target needs beyond the module: its special token ids."""

    bos_id: int | None
    eos_ids: tuple[int, ...]


class Target(Protocol):
    name: str

    def export(self, model: CausalLM, out_dir: Path, spec: Any, context: ExportContext,
               progress: Progress) -> ExportedArtifact: ...

    def twin(self, model: CausalLM, spec: Any) -> tuple[nn.Module, str]:
        """The twin for an artifact exported from `model` with `spec`, rebuilt without exporting
        (for `cpm-mobile check` of a published bundle)."""


def check_model_dtype(model: CausalLM, target: str, dtype: torch.dtype = torch.float32) -> None:
    """Targets trace an fp32 module; precision changes are the target's own conversion."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {dtype}:
        raise InputError("precision", f"the {target} target converts a {str(dtype).removeprefix('torch.')} module, "
                                      f"got parameters of {sorted(map(str, dtypes))}")
