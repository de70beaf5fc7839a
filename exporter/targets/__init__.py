"""The artifact targets, created by name so that importing one never imports the others."""
from __future__ import annotations

import importlib

from exporter.targets.base import ArtifactInfo, ExportContext, Progress, Target, no_progress

_TARGETS = {
    "executorch": ("exporter.targets.executorch", "ExecuTorchTarget"),
    "onnx": ("exporter.targets.onnx", "OnnxTarget"),
    "coreml": ("exporter.targets.coreml", "CoreMLTarget"),
}


def get_target(name: str) -> Target:
    module_name, class_name = _TARGETS[name]
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["ArtifactInfo", "ExportContext", "Progress", "Target", "get_target", "no_progress"]
