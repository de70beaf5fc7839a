"""The artifact targets, created by name so that importing one never imports the others."""
from __future__ import annotations

import importlib

from cpm_mobile.exporter.targets.base import ArtifactInfo, ExportContext, Progress, Target, no_progress

_TARGETS = {
    "executorch": ("cpm_mobile.exporter.targets.executorch", "ExecuTorchTarget"),
    "onnx": ("cpm_mobile.exporter.targets.onnx", "OnnxTarget"),
    "coreml": ("cpm_mobile.exporter.targets.coreml", "CoreMLTarget"),
}


def get_target(name: str) -> Target:
    module_name, class_name = _TARGETS[name]
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["ArtifactInfo", "ExportContext", "Progress", "Target", "get_target", "no_progress"]
