"""Run the check for a set of artifacts in a bundle folder and build the report.

Used by export (on the staging folder, before it is published) and by `cpm-mobile check` (on a
published bundle). The reference is the plain PyTorch module, computed once for all artifacts.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.models.transformer import CausalLM
from exporter.targets.base import Progress, no_progress
from exporter.tokenizer import TextTokenizer
from recipes.schema import Recipe
from runtimes.base import open_session
from runtimes.check import CheckPlan, compare, greedy_runs, judge, teacher_forced_runs
from runtimes.torch_session import TorchSession


def build_plan(recipe: Recipe, tokenizer: TextTokenizer, heldout_text: str, max_seq_len: int) -> CheckPlan:
    prompts = [tokenizer.encode(p) for p in recipe.check.prompts]
    window = min(recipe.check.heldout_tokens, max_seq_len)
    heldout = tokenizer.encode(heldout_text) if heldout_text else []
    windows = [heldout[i * window : (i + 1) * window] for i in range(recipe.check.heldout_windows)]
    return CheckPlan(
        prompts=prompts,
        max_new_tokens=recipe.check.max_new_tokens,
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
    tokenizer: TextTokenizer,
    recipe: Recipe,
    bundle_dir: Path,
    artifacts: list[dict[str, Any]],
    heldout_text: str,
    progress: Progress = no_progress,
    extra_breaches: dict[str, list[str]] | None = None,
) -> CheckResult:
    plan = build_plan(recipe, tokenizer, heldout_text, reference_model.max_seq_len)
    progress("check: PyTorch reference", None)
    reference = greedy_runs(TorchSession(reference_model), plan)
    entries: dict[str, Any] = {}
    for index, artifact in enumerate(artifacts):
        target = artifact["target"]
        progress(f"check: {target}", index / max(len(artifacts), 1))
        tolerances = recipe.targets[target].tolerances.model_dump()
        breaches = list((extra_breaches or {}).get(target, []))
        try:
            session = open_session(bundle_dir, artifact)
            measured = compare(reference, teacher_forced_runs(session, plan, reference), plan)
            verified = session.verified
            breaches += judge(measured, tolerances)
            breaches += [f"structure: {s['name']}: {s['detail']}" for s in getattr(session, "structure", []) if not s["passed"]]
        except Exception as exc:  # an artifact its runtime cannot load or run has failed its check
            measured, verified = {}, "not run"
            breaches.append(f"runtime error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        entries[target] = {
            "entry": artifact["entry"],
            "verified": verified,
            "precision": recipe.targets[target].precision,
            "metrics": measured,
            "tolerances": tolerances,
            "breaches": breaches,
            "passed": not breaches,
        }
    progress("check: done", 1.0)
    samples = [
        {"prompt": text, "continuation": tokenizer.decode(run.generated)}
        for text, run in zip(recipe.check.prompts, reference.runs)
    ]
    report = {
        "passed": all(e["passed"] for e in entries.values()),
        "artifacts": entries,
        "reference": {"runtime": "PyTorch eager", "greedy_samples": samples, "host": platform.platform()},
        "plan": {
            "prompts": len(plan.prompts),
            "max_new_tokens": plan.max_new_tokens,
            "heldout_windows": len(plan.heldout_windows),
            "heldout_tokens": sum(len(w) for w in plan.heldout_windows),
        },
    }
    return CheckResult(report)
