"""What every target (executorch, onnx, coreml) takes and returns.

A target turns an export-ready CausalLM into artifact files inside a folder it is given, and
describes them: which files, and the I/O contract a runtime (ours or the app's) needs. It knows
nothing of the checkpoint's layout, and never writes outside `out_dir`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from exporter.models.transformer import CausalLM

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
class ExportContext:
    """Facts about the model a target may need beyond the module itself."""

    max_seq_len: int
    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    precision: str = "fp32"  # fp32 | fp16
    options: dict[str, Any] = field(default_factory=dict)  # target-specific, from the recipe


class Target(Protocol):
    name: str

    def export(self, model: CausalLM, out_dir: Path, context: ExportContext, progress: Progress) -> ArtifactInfo: ...


def check_context_matches(model: CausalLM, context: ExportContext, target: str, precisions) -> None:
    """The checks every target makes before exporting: a precision it supports, and a context that
    describes this model (a cache of the recipe's length, the checkpoint's vocabulary)."""
    from exporter.errors import InputError

    if context.options.get("quantization"):
        # A quantisation step slots in per target; exporting fp32 in its place would pass the check
        # while ignoring the recipe.
        raise InputError("quantization", f"the {target} target does not quantise yet")
    if context.precision not in precisions:
        raise InputError("precision", f"'{context.precision}' is not supported by the {target} target "
                                      f"(supported: {', '.join(precisions)})")
    if context.max_seq_len != model.max_seq_len:
        raise InputError("max_seq_len", f"context says {context.max_seq_len} but the model's KV cache holds "
                                        f"{model.max_seq_len} positions")
    if context.vocab_size != model.config.vocab_size:
        raise InputError("vocab_size", f"context says {context.vocab_size} but the model has {model.config.vocab_size}")
