"""Graph passes applied to the export-ready module before any target sees it.

A pass takes the module and its options and returns a module with the same contract and (up to
its stated tolerance) the same numbers: the check measures every artifact against the plain
reference, so a pass that drifts shows up in report.json. Sparsity and quantisation passes
register here.
"""
from __future__ import annotations

from typing import Any, Callable

from exporter.errors import InputError
from exporter.models.transformer import CausalLM

GraphPass = Callable[[CausalLM, dict[str, Any]], CausalLM]
PASSES: dict[str, GraphPass] = {}


def register_pass(name: str) -> Callable[[GraphPass], GraphPass]:
    def decorate(function: GraphPass) -> GraphPass:
        PASSES[name] = function
        return function

    return decorate


def apply_passes(model: CausalLM, passes: list[Any], source: str = "recipe") -> CausalLM:
    """Apply the recipe's passes in order; an unknown pass name is bad input."""
    for spec in passes:
        if spec.name not in PASSES:
            known = ", ".join(sorted(PASSES)) or "none yet"
            raise InputError(source, f"unknown pass '{spec.name}' (known: {known})")
        model = PASSES[spec.name](model, dict(spec.options))
    return model


# Passes register themselves on import; importing them here makes every pass name known.
import exporter.passes.blockffn_sparse  # noqa: E402,F401
