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


class StructuralFault(Exception):
    """A written artifact is not what its spec says (weights not stored quantised, a weight its twin
    cannot be read back for): the check reports it as a breach of that artifact, never a traceback."""


@dataclass(frozen=True)
class ExportContext:
    """Facts about the checkpoint a target needs beyond the module: its special token ids."""

    bos_id: int | None
    eos_ids: tuple[int, ...]


class Target(Protocol):
    name: str

    def validate(self, model: CausalLM, spec: Any) -> list[str]:
        """Pre-flight: every reason this target refuses `spec` for a model of these shapes (and this
        checkpoint grid), one line each; [] when it takes it. `model` may live on the meta device."""

    def export(self, model: CausalLM, out_dir: Path, spec: Any, context: ExportContext,
               progress: Progress) -> ExportedArtifact:
        """Write the artifact; its twin is `twin()` of the written files, as `check` will build it."""

    def twin(self, model: CausalLM, spec: Any, bundle_dir: Path, artifact: dict[str, Any]) -> tuple[nn.Module, str]:
        """What the stored artifact computes, for export's check and `cpm-mobile check` alike: read back
        from the artifact's files where they hold weights the model does not (codes, scales, palettes).
        Raises StructuralFault when the files cannot be read back so."""

    def structure(self, bundle_dir: Path, artifact: dict[str, Any], twin: nn.Module) -> list[str]:
        """The artifact's structural checks: 'name: detail' for each that fails."""


def exported_with_twin(target: Any, model: CausalLM, spec: Any, out_dir: Path, info: ArtifactInfo) -> ExportedArtifact:
    """The artifact with its twin as `check` builds it (target.twin on the written files); a structural fault
    becomes the twin's absence, which the check reports as a breach of this artifact."""
    from dataclasses import asdict

    try:
        twin, description = target.twin(model, spec, out_dir, asdict(info))
    except StructuralFault as fault:
        twin, description = None, f"not read back ({fault})"
    return ExportedArtifact(info, twin, description)


def refusals_of(*checks: Callable[[], None]) -> list[str]:
    """Run checks that raise InputError at their first problem; every problem, one line each."""
    found = []
    for check in checks:
        try:
            check()
        except InputError as error:
            found.append(str(error))
    return found


def check_model_dtype(model: CausalLM, target: str, dtype: torch.dtype = torch.float32) -> None:
    """Targets trace an fp32 module; precision changes are the target's own conversion."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {dtype}:
        raise InputError("precision", f"the {target} target converts a {str(dtype).removeprefix('torch.')} module, "
                                      f"got parameters of {sorted(map(str, dtypes))}")
