"""The check of a set of artifacts in a bundle folder, and its report: two gates per artifact.

Used by export (on the staging folder, before it is published) and by `cpm-mobile check` (on a
published bundle). The fp32 reference greedily decodes every prompt once; every artifact and its
twin are then fed the same tokens (teacher-forced), and the artifact is judged twice:

- faithfulness, against its twin (what the target says the artifact computes): tight bounds, so
  a breach is an implementation fault;
- fidelity, against the fp32 reference: the recipe's quality bounds, so a breach means the recipe
  costs too much.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cpm_mobile.exporter.contract import FORMAT_VERSION
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.passes import apply_passes
from cpm_mobile.exporter.spread import loosened, twin_spread
from cpm_mobile.exporter.targets.base import Progress, StructuralFault, no_progress
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.tokenizer_gate import apply_gate
from cpm_mobile.recipes.schema import Recipe
from cpm_mobile.runtimes.base import open_session
from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, judge, teacher_forced_runs
from cpm_mobile.runtimes.torch_session import TorchSession

GATES = ("faithfulness", "fidelity")


@dataclass
class Twin:
    module: nn.Module | None  # None: the artifact's files could not be read back (a structural fault)
    description: str


def artifact_twins(source: CausalLM, recipe: Recipe, bundle_dir: Path, artifacts: list[dict[str, Any]],
                   models: dict[str, CausalLM] | None = None, targets: dict[str, Any] | None = None,
                   ) -> tuple[dict[str, Twin], dict[str, list[str]]]:
    """Each artifact's twin, built by its target from the written files, and its structural faults.

    Export's check and `cpm-mobile check` both call this on the same bytes, so both hold an artifact
    to the same twin. `source`: what the targets exported (the reference, or a calibration recipe's
    calibrated variant of it). `models`: the passes' variants export used (saves applying them again);
    `targets`: the target instances export used (they keep what they built for the twin).
    """
    twins: dict[str, Twin] = {}
    faults: dict[str, list[str]] = {}
    for artifact in artifacts:
        name = artifact["target"]
        spec = recipe.targets[name]
        model = (models or {}).get(name) or apply_passes(source, [*recipe.passes, *spec.passes], name)
        target = (targets or {}).get(name) or get_target(name)
        try:
            module, description = target.twin(model, spec, bundle_dir, artifact)
        except StructuralFault as fault:
            twins[name], faults[name] = Twin(None, "not read back"), [f"structure: {fault}"]
            continue
        twins[name] = Twin(module, description)
        faults[name] = [f"structure: {fault}" for fault in target.structure(bundle_dir, artifact, module)]
    return twins, faults


def build_plan(recipe: Recipe, tokenizer: TextTokenizer, heldout_text: str, max_seq_len: int,
               stop_ids: tuple[int, ...] = (), heldout_source: str = "held-out text") -> CheckPlan:
    prompts = [tokenizer.encode(p) for p in recipe.check.prompts]
    window = min(recipe.check.heldout_tokens, max_seq_len)
    heldout = tokenizer.encode(heldout_text) if heldout_text and recipe.check.heldout_windows else []
    if recipe.check.heldout_windows and heldout_text and len(heldout) < 2:
        raise InputError(heldout_source, f"the tokenizer turns it into {len(heldout)} token(s): nothing to measure "
                                         "perplexity on")
    windows = [heldout[i * window : (i + 1) * window] for i in range(recipe.check.heldout_windows)]
    return CheckPlan(
        prompts=prompts,
        max_new_tokens=recipe.check.max_new_tokens,
        stop_ids=tuple(stop_ids),
        heldout_windows=[w for w in windows if len(w) >= 2],
    )


@dataclass
class CheckResult:
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def check_artifacts(
    reference_model: CausalLM,
    twins: dict[str, Twin],
    tokenizer: TextTokenizer,
    recipe: Recipe,
    bundle_dir: Path,
    artifacts: list[dict[str, Any]],
    plan: CheckPlan,
    progress: Progress = no_progress,
    extra_breaches: dict[str, list[str]] | None = None,
    tokenizer_gate: dict[str, dict[str, Any]] | None = None,
) -> CheckResult:
    """Both gates of every artifact; `tokenizer_gate`: each artifact's tokenizer entry (tokenizer_gate.run_gate),
    folded in as a third gate."""
    progress("check: PyTorch reference", None)
    reference = greedy_runs(TorchSession(reference_model), plan)
    entries: dict[str, Any] = {}
    for index, artifact in enumerate(artifacts):
        target = artifact["target"]
        spec = recipe.targets[target]
        progress(f"check: {target}", index / max(len(artifacts), 1))
        twin = twins[target]
        expected = {
            # The twin's own rows on the reference's tokens; the plain reference is its own twin.
            "faithfulness": reference if twin.module is reference_model
            else None if twin.module is None else teacher_forced_runs(TorchSession(twin.module), plan, reference),
            "fidelity": reference,
        }
        gates: dict[str, Any] = {}
        breaches = {"artifact": list((extra_breaches or {}).get(target, []))}
        try:
            session = open_session(bundle_dir, artifact)
            observed = teacher_forced_runs(session, plan, reference)
            verified = session.verified
        except Exception as exc:  # an artifact its runtime cannot load or run has failed its check
            observed, verified = None, "not run"
            breaches["artifact"].append(f"runtime error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        for gate in GATES:
            tolerances = getattr(spec, gate)
            bounds = tolerances.model_dump(exclude={"spread"})
            measurable = observed is not None and expected[gate] is not None
            spread = None
            if measurable and tolerances.spread is not None and twin.module is not None:
                # A statistical twin: the bounds follow its own spread at this model's depth.
                progress(f"check: {target} twin spread", (index + 0.5) / max(len(artifacts), 1))
                metrics = twin_spread(twin.module, expected[gate], plan, reference, tolerances.spread,
                                      tolerances.tie_margin_rel)
                spread = {"metrics": metrics, "stated": bounds, **tolerances.spread.model_dump()}
                bounds = loosened(bounds, metrics, tolerances.spread.margin_db)
            measured = compare(expected[gate], observed, plan, tolerances.tie_margin_rel) if measurable else {}
            gate_breaches = judge(measured, bounds) if measurable else []
            gates[gate] = {
                "against": twin.description if gate == "faithfulness" else "fp32 reference",
                "metrics": measured,
                "tolerances": bounds,
                **({"spread": spread} if spread is not None else {}),
                "breaches": gate_breaches,
                "passed": not gate_breaches and not breaches["artifact"],
            }
        failed = [g for g in GATES if gates[g]["breaches"]]
        entries[target] = {
            "entry": artifact["entry"],
            "verified": verified,
            "precision": spec.precision,
            "quantization": spec.quantization.model_dump() if spec.quantization is not None else None,
            **gates,
            "breaches": breaches["artifact"] + [f"{g}: {b}" for g in GATES for b in gates[g]["breaches"]],
            "failed_gates": failed + (["artifact"] if breaches["artifact"] else []),
            "passed": not failed and not breaches["artifact"],
        }
        # The tokenizer gate: the stock client's own tokenizer against the checkpoint's (exporter/tokenizer_gate.py).
        apply_gate(entries[target], (tokenizer_gate or {}).get(target))
    progress("check: done", 1.0)
    samples = [
        {"prompt": text, "continuation": tokenizer.decode(run.generated)}
        for text, run in zip(recipe.check.prompts, reference.runs)
    ]
    report = {
        "format_version": FORMAT_VERSION,
        "passed": all(e["passed"] for e in entries.values()),
        "artifacts": entries,
        "reference": {"runtime": "PyTorch eager", "greedy_samples": samples, "host": platform.platform()},
        "plan": {
            "prompts": len(plan.prompts),
            "max_new_tokens": plan.max_new_tokens,
            "stop_ids": list(plan.stop_ids),
            "heldout_windows": len(plan.heldout_windows),
            "heldout_tokens": sum(len(w) for w in plan.heldout_windows),
        },
    }
    return CheckResult(report)
