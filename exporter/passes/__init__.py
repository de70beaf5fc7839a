"""Graph passes applied to the export-ready module before a target sees it.

A pass takes the module, its options and the capabilities of the target it prepares the module
for, and returns a new module (a variant: exporter/models/variant.py) with the same contract and
the same numbers up to its stated tolerance; the input is never changed. A pass declares the
capability it needs (exporter/targets/spec.py, Capabilities); a target that lacks it refuses the
pass with the target's own reason, and the pass picks its form from the capability's value, never
from the target's name (nor by asking which exporter is tracing it). What a pass returns is the twin the target's
artifact is checked against, and the check also measures it against the plain fp32 reference.
"""
from cpm_mobile.exporter.passes.registry import PASSES, apply_passes, check_passes, pass_refusals, register_pass

# Passes register themselves on import; importing them here makes every pass name known.
import cpm_mobile.exporter.passes.blockffn_sparse  # noqa: E402,F401

__all__ = ["PASSES", "apply_passes", "check_passes", "pass_refusals", "register_pass"]
