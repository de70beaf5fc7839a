"""The quality cost of recipes on a checkpoint, from eager twins alone: no program is lowered, nothing written.

A recipe's ExecuTorch twin is the torchao module whose eager run is what XNNPACK's integer kernels compute
(the faithfulness gate holds the .pte to it), built from the recipe alone; a calibrated recipe (int4-gptq)
calibrates first, as its export does. Scored by the fidelity gate's own measure (exporter/verify.py: the
fp32 reference's greedy runs and held-out windows, teacher-forced) against the recipe's own fidelity bounds,
it says what the export's fidelity gate will find before any artifact is built. The ExecuTorch twin rounds
activations per token, the others (ONNX MatMulNBits per block of 32, Core ML not at all), so for the same
grid it is the costliest of the three formats (bench/reports/quality: .pte KL >= .onnx >= .mlpackage).

Used by `cpm-mobile export --dry-run` (every shipped recipe that runs on the checkpoint) and, when an export
fails its fidelity gate, to name the recipe that would pass (`suggest`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cpm_mobile.exporter.calibration import (
    CalibrationText, calibrate_for_recipe, calibrated_model, calibrated_spec, with_planned_grid,
)
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.passes import apply_passes
from cpm_mobile.exporter.preflight import recipe_refusals
from cpm_mobile.exporter.sizes import predict_bytes, shape_model
from cpm_mobile.exporter.targets.base import Progress, no_progress
from cpm_mobile.exporter.targets import registry
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.recipes.schema import Recipe, load_recipe, recipe_names
from cpm_mobile.runtimes.check import CheckPlan, Observations, compare, greedy_runs, judge, teacher_forced_runs
from cpm_mobile.runtimes.torch_session import TorchSession

# The target whose twin is built from the recipe alone (ExecuTorch's; see the module docstring).
TWIN_TARGET = next(name for name in registry.TARGET_NAMES if registry.capabilities(name).twin_from_spec)
MEASURED_ON = "eager ExecuTorch twin (XNNPACK's numerics), by the fidelity gate's measure and the recipe's bounds"


@dataclass
class Estimate:
    recipe: str
    size_bytes: int  # the ExecuTorch artifact, predicted from the shapes (exporter/sizes.py)
    fp32_ratio: float
    metrics: dict[str, Any]  # the fidelity gate's measure of the eager twin
    bounds: dict[str, Any]  # the recipe's fidelity bounds
    breaches: list[str]

    @property
    def passes(self) -> bool:
        return not self.breaches

    @property
    def bounded(self) -> bool:
        """The recipe states a fidelity bound (ternary on a model not trained ternary states none)."""
        return any(value is not None for key, value in self.bounds.items() if key != "tie_margin_rel")

    def summary(self) -> str:
        return summary(self.metrics)


def ppl_delta_pct(metrics: dict[str, Any]) -> float | None:
    """The perplexity's signed change against the reference's, in percent (None without held-out windows)."""
    if metrics.get("ppl") is None or not metrics.get("ppl_expected"):
        return None
    return 100.0 * (metrics["ppl"] / metrics["ppl_expected"] - 1.0)


def summary(metrics: dict[str, Any]) -> str:
    kl, ppl = metrics.get("kl"), ppl_delta_pct(metrics)
    parts = [f"KL {kl:.2e}" if kl is not None else None, f"ppl {ppl:+.2f} %" if ppl is not None else None]
    return ", ".join(p for p in parts if p)


@dataclass
class Candidates:
    """The shipped recipes that run on this checkpoint and have an ExecuTorch target, smallest first."""

    recipes: list[Recipe]
    sizes: dict[str, int]
    fp32_size: int
    skipped: dict[str, str] = field(default_factory=dict)  # recipe -> why it is not estimated


def candidates(config: Any, tied: bool, names: list[str] | None = None) -> Candidates:
    fp32 = load_recipe("fp32")
    fp32_size = predict_bytes(shape_model(config, tied, fp32.max_seq_len), fp32.targets[TWIN_TARGET])
    recipes, sizes, skipped = [], {}, {}
    for name in names or recipe_names():
        recipe = load_recipe(name)
        if TWIN_TARGET not in recipe.targets:
            skipped[recipe.name] = f"no {TWIN_TARGET} target (its format quantises during conversion)"
            continue
        recipe = recipe.select([TWIN_TARGET])
        refusals = recipe_refusals(recipe, config, tied)
        if refusals:
            skipped[recipe.name] = refusals[0]
            continue
        sizes[recipe.name] = _twin_target_size(recipe, config, tied)
        recipes.append(recipe)
    recipes.sort(key=lambda r: (sizes[r.name], r.name))
    return Candidates(recipes, sizes, fp32_size, skipped)


def reference_runs(reference: CausalLM, plan: CheckPlan) -> Observations:
    return greedy_runs(TorchSession(reference), plan)


def estimate(reference: CausalLM, recipe: Recipe, plan: CheckPlan, expected: Observations, tokenizer: TextTokenizer,
             calibration: CalibrationText | None, size_bytes: int, fp32_size: int,
             progress: Progress = no_progress) -> Estimate:
    """The recipe's ExecuTorch twin against the fp32 reference's runs `expected`, by its fidelity bounds
    (`calibration`: the text a calibration recipe calibrates on)."""
    spec = recipe.targets[TWIN_TARGET]
    source = reference
    if recipe.calibration is not None:
        source = calibrated_model(reference, calibrate_for_recipe(reference, recipe, tokenizer, calibration, progress))
    variant = apply_passes(source, [*recipe.passes, *spec.passes], TWIN_TARGET)
    twin, _ = get_target(TWIN_TARGET).twin(variant, spec)
    observed = teacher_forced_runs(TorchSession(twin), plan, expected)
    metrics = compare(expected, observed, plan, spec.fidelity.tie_margin_rel)
    bounds = spec.fidelity.model_dump(exclude={"spread"})
    return Estimate(recipe.name, size_bytes, size_bytes / fp32_size, metrics, bounds, judge(metrics, bounds))


def suggest(reference: CausalLM, failed: Recipe, plan: CheckPlan, tokenizer: TextTokenizer,
            calibration: CalibrationText, progress: Progress = no_progress) -> dict[str, Any]:
    """After `failed` breached its fidelity gate: the smallest shipped recipe, at least 0.9x its size, whose eager
    twin meets both its own fidelity bounds and the failed recipe's (the quality asked for), measured in that order
    and stopping at the first, as report.json's `suggestion`; recipe None when none does short of fp32."""
    found = candidates(reference.config, reference.tied)
    asked = _asked_bounds(failed)
    floor = 0.9 * found.sizes.get(failed.name, _twin_target_size(failed, reference.config, reference.tied))
    expected = reference_runs(reference, plan)
    tried: list[str] = []
    for recipe in found.recipes:
        if recipe.name == failed.name or found.sizes[recipe.name] < floor or _is_fp32(recipe):
            continue
        progress(f"suggest: {recipe.name} (eager twin)", None)
        result = estimate(reference, recipe, plan, expected, tokenizer, calibration, found.sizes[recipe.name],
                          found.fp32_size, progress)
        if not result.bounded:
            continue
        breaches = result.breaches + [f"{b} (asked by {failed.name})" for b in judge(result.metrics, asked)]
        tried.append(f"{recipe.name}: {result.summary()}" + (f" ({breaches[0]})" if breaches else ""))
        if not breaches:
            return {"recipe": recipe.name, "measured_on": MEASURED_ON, "metrics": result.metrics,
                    "bounds": result.bounds, "size_vs_fp32": result.fp32_ratio, "tried": tried}
    return {"recipe": None, "measured_on": MEASURED_ON, "tried": tried}


def _asked_bounds(recipe: Recipe) -> dict[str, Any]:
    """The strictest fidelity bound the failed recipe states for any of its targets, per metric."""
    asked: dict[str, Any] = {}
    for spec in recipe.targets.values():
        for key, value in spec.fidelity.model_dump(exclude={"spread", "tie_margin_rel"}).items():
            if value is None:
                continue
            stricter = max if key.startswith("min_") else min
            asked[key] = value if asked.get(key) is None else stricter(asked[key], value)
    return asked


def _twin_target_size(recipe: Recipe, config: Any, tied: bool) -> int:
    """The recipe's ExecuTorch artifact, predicted from the shapes (0 without one)."""
    spec = recipe.targets.get(TWIN_TARGET)
    if spec is None:
        return 0
    model = apply_passes(with_planned_grid(shape_model(config, tied, recipe.max_seq_len), recipe),
                         [*recipe.passes, *spec.passes], TWIN_TARGET)
    return predict_bytes(model, calibrated_spec(spec, recipe.calibration))


def verdict(suggestion: dict[str, Any] | None) -> str:
    """The suggestion as the failure line's tail."""
    if not suggestion:
        return ""
    if suggestion["recipe"] is None:
        return "; no shipped recipe of at least its size passes short of fp32 (eager twins)"
    return (f"; recipe {suggestion['recipe']} would pass (eager twin: {summary(suggestion['metrics'])}, "
            f"{suggestion['size_vs_fp32']:.2f}x fp32 size)")


def _is_fp32(recipe: Recipe) -> bool:
    return all(spec.quantization is None for spec in recipe.targets.values())


def dry_run(model_path: Any, heldout: Any = None, calibration: Any = None, names: list[str] | None = None,
            progress: Progress = no_progress) -> tuple[list[Estimate], dict[str, str]]:
    """Every shipped recipe (or `names`) that runs on the checkpoint, estimated on the fp32 recipe's check plan:
    (estimates smallest first, skipped recipe -> why)."""
    from cpm_mobile.exporter.calibration import calibration_text
    from cpm_mobile.exporter.defaults import HELDOUT_TEXT, read_heldout
    from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
    from cpm_mobile.exporter.verify import build_plan

    progress("load checkpoint", None)
    checkpoint = load_checkpoint(model_path)
    tokenizer = TextTokenizer.from_folder(checkpoint.folder)
    config = checkpoint.config
    tokenizer.check_fits(config.vocab_size, checkpoint.files.config)
    heldout_text = read_heldout(heldout)
    base = load_recipe("fp32")
    plan = build_plan(base, tokenizer, heldout_text, base.max_seq_len, config.eos_token_ids, heldout or HELDOUT_TEXT)
    calibration_input = calibration_text(calibration, heldout_text, plan.heldout_windows)
    found = candidates(config, checkpoint.tied, names)
    reference = build_model(checkpoint, max_seq_len=base.max_seq_len)
    progress("fp32 reference", None)
    expected = reference_runs(reference, plan)
    estimates = []
    for index, recipe in enumerate(found.recipes):
        progress(f"estimate {recipe.name} (eager twin)", index / max(len(found.recipes), 1))
        estimates.append(estimate(reference, recipe, plan, expected, tokenizer, calibration_input,
                                  found.sizes[recipe.name], found.fp32_size, progress))
    progress("done", 1.0)
    return estimates, found.skipped


def vision_language_caption(model_path: Any) -> str | None:
    """For a vision-language folder, what the dry run's rows leave out: they are its LLM on text; the vision
    encoder's size (fp32, and on vlm-int4's 8-bit grid: one code a weight, an fp16 scale per 32) comes on top
    of every .pte, and only the export's check measures its cost. None for a text checkpoint."""
    import torch

    from cpm_mobile.exporter.inspect import human_size
    from cpm_mobile.exporter.models.checkpoint import find_files
    from cpm_mobile.exporter.models.vision import VisionConfig, VisionEncoder
    from cpm_mobile.exporter.vlm_bundle import is_vision_language

    if not is_vision_language(model_path):
        return None
    with torch.device("meta"):  # the shapes the loader holds the weights to; no weight is read
        encoder = VisionEncoder(VisionConfig.from_file(find_files(model_path).config), None)
    count = sum(p.numel() for p in encoder.parameters())
    return (f"vision-language checkpoint: the rows are its LLM on text; its vision encoder ({count / 1e6:.1f} M "
            f"parameters, {human_size(4 * count)} fp32, about {human_size(int(count * (1 + 2 / 32)))} on vlm-int4's "
            "8-bit grid) comes on top, and only the export's check measures its cost (vlm-int4's LLM is int4's)")
