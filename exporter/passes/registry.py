"""The passes by name, and what each needs of a target (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets import registry
from cpm_mobile.exporter.targets.spec import Capabilities

GraphPass = Callable[[CausalLM, dict[str, Any], Capabilities], CausalLM]


@dataclass(frozen=True)
class RegisteredPass:
    function: GraphPass
    needs: str | None  # the Capabilities field the target must set (None: every target carries it)


PASSES: dict[str, RegisteredPass] = {}


def register_pass(name: str, needs: str | None = None) -> Callable[[GraphPass], GraphPass]:
    """Register a pass; `needs` names the target capability its form requires."""
    def decorate(function: GraphPass) -> GraphPass:
        PASSES[name] = RegisteredPass(function, needs)
        return function

    return decorate


def pass_refusals(passes: Iterable[Any], target: str) -> list[str]:
    """Why `target` cannot take these passes (unknown ones, or a capability it lacks): [] when it can."""
    refusals = []
    capabilities = registry.capabilities(target)
    for spec in passes:
        if spec.name not in PASSES:
            known = ", ".join(sorted(PASSES)) or "none yet"
            refusals.append(f"unknown pass '{spec.name}' (known: {known})")
            continue
        needs = PASSES[spec.name].needs
        if needs and getattr(capabilities, needs) is None:
            reason = getattr(capabilities, f"{needs}_refusal", "") or f"it has no {needs} capability"
            refusals.append(f"the '{spec.name}' pass is not supported by the {target} target: {reason}")
    return refusals


def check_passes(passes: Iterable[Any], target: str, source: str = "recipe") -> None:
    """Refuse, before any work, a pass that is unknown or that `target` cannot carry."""
    refusals = pass_refusals(passes, target)
    if refusals:
        raise InputError(source, refusals[0])


def apply_passes(model: CausalLM, passes: Iterable[Any], target: str, source: str = "recipe") -> CausalLM:
    """Apply passes in order for one target; an unknown pass, or one the target cannot carry, is bad input."""
    passes = list(passes)
    check_passes(passes, target, source)
    capabilities = registry.capabilities(target)
    for spec in passes:
        model = PASSES[spec.name].function(model, dict(spec.options), capabilities)
    return model

