"""The one list of targets. Everything that names targets (the CLI's choices, the recipe schema's union,
the passes' support, size prediction, the pre-flight) reads it; adding a target is a folder
`exporter/targets/<name>/` (spec.py, target.py) and one line here.

Each target package holds:
- spec.py: `SPEC` (its pydantic spec, a TargetSpec) and `CAPABILITIES`; pydantic only, loaded when a recipe is parsed;
- target.py: `TARGET`, the class with validate (pre-flight), export, twin and structural checks;
- size.py: `stored_bytes(model, spec)`, the artifact's size predicted from the shapes.
Its runtime, which opens and runs the artifact, is `cpm_mobile.runtimes.<name>`.
"""
from __future__ import annotations

import importlib
from typing import Any

TARGET_NAMES: tuple[str, ...] = ("executorch", "onnx", "coreml")


def _module(name: str, part: str) -> Any:
    if name not in TARGET_NAMES:
        raise KeyError(f"unknown target '{name}' (known: {', '.join(TARGET_NAMES)})")
    return importlib.import_module(f"{__package__}.{name}.{part}")


def spec_type(name: str) -> type:
    return _module(name, "spec").SPEC


def capabilities(name: str) -> Any:
    return _module(name, "spec").CAPABILITIES


def get_target(name: str) -> Any:
    """The target's implementation (imports its exporter's libraries)."""
    return _module(name, "target").TARGET()


def size_rule(name: str) -> Any:
    """`stored_bytes(model, spec) -> int` of the target."""
    return _module(name, "size").stored_bytes
