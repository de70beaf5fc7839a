"""Graph passes applied to the export-ready module before a target sees it.

A pass takes the module, its options and the name of the target it prepares the module for, and
returns a new module (a variant: exporter/models/variant.py) with the same contract and the same
numbers up to its stated tolerance; the input is never changed. The target decides nothing about
passes: a pass declares which targets can carry its form, and picks the form per target itself
(never by asking which exporter is tracing it). What a pass returns is the twin the target's
artifact is checked against, and the check also measures it against the plain fp32 reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.transformer import CausalLM

GraphPass = Callable[[CausalLM, dict[str, Any], str], CausalLM]


@dataclass(frozen=True)
class RegisteredPass:
    function: GraphPass
    targets: dict[str, str | None]  # target -> None when supported, else why not


PASSES: dict[str, RegisteredPass] = {}


def register_pass(name: str, unsupported: dict[str, str] | None = None) -> Callable[[GraphPass], GraphPass]:
    """Register a pass; `unsupported` maps a target name to the reason it cannot carry the pass's form."""
    def decorate(function: GraphPass) -> GraphPass:
        reasons = dict(unsupported or {})
        PASSES[name] = RegisteredPass(function, {t: reasons.get(t) for t in ("executorch", "onnx", "coreml")})
        return function

    return decorate


def check_passes(passes: Iterable[Any], target: str, source: str = "recipe") -> None:
    """Refuse, before any work, a pass that is unknown or that `target` cannot carry."""
    for spec in passes:
        if spec.name not in PASSES:
            known = ", ".join(sorted(PASSES)) or "none yet"
            raise InputError(source, f"unknown pass '{spec.name}' (known: {known})")
        reason = PASSES[spec.name].targets.get(target)
        if reason:
            raise InputError(source, f"the '{spec.name}' pass is not supported by the {target} target: {reason}")


def apply_passes(model: CausalLM, passes: Iterable[Any], target: str, source: str = "recipe") -> CausalLM:
    """Apply passes in order for one target; an unknown pass, or one the target cannot carry, is bad input."""
    passes = list(passes)
    check_passes(passes, target, source)
    for spec in passes:
        model = PASSES[spec.name].function(model, dict(spec.options), target)
    return model


# Passes register themselves on import; importing them here makes every pass name known.
import cpm_mobile.exporter.passes.blockffn_sparse  # noqa: E402,F401
