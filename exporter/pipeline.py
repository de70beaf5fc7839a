"""The export flow, one direction: checkpoint -> module -> passes -> artifacts -> check -> bundle."""
from __future__ import annotations

import platform
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from cpm_mobile.exporter import __version__
from cpm_mobile.exporter.calibration import GRID_FILE, calibrate_for_recipe, calibrated_model, calibration_text, save_grid
from cpm_mobile.exporter.bundle import (  # ExportResult: what export_bundle returns, re-exported here
    MANIFEST, REPORT, ExportResult, default_bundle_name, file_hashes, interruptible, prepare_destination, publish,
    staging_folder, write_json,
)
from cpm_mobile.exporter.contract import (
    BUNDLE_FORMAT, FORMAT_VERSION, MANIFEST_SCHEMA_FILE, Manifest, Report, manifest_json_schema,
)
from cpm_mobile.exporter.defaults import HELDOUT_TEXT, read_heldout
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.export_cost import StageClock
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from cpm_mobile.exporter.passes import apply_passes
from cpm_mobile.exporter.preflight import preflight
from cpm_mobile.exporter.sizes import state_bytes
from cpm_mobile.exporter.targets.base import ExportContext, Progress, no_progress
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.tokenizer_gate import gate_texts, run_gate, write_client_files
from cpm_mobile.exporter.verify import artifact_twins, build_plan, check_artifacts
from cpm_mobile.recipes.schema import Recipe

LIBRARIES = ("torch", "executorch", "onnx", "onnxruntime", "onnxscript", "coremltools", "tokenizers", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "cpm-mobile": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def export_bundle(
    model_path: str | Path,
    recipe: Recipe,
    out_dir: str | Path,
    name: str | None = None,
    heldout: Path | None = None,
    progress: Progress = no_progress,
    force: bool = False,
    calibration: Path | None = None,
    max_seq_len: int | None = None,
) -> ExportResult:
    """Export every target of the recipe into one bundle, check it, and publish it atomically.

    A bundle whose check breaches a tolerance is published as `<name>.rejected` instead, so the
    report can be read but no app picks it up as a valid bundle. An existing bundle at the
    destination is refused unless `force`, and then replaced only by a complete new one.

    calibration: the text a recipe's calibration step (GPTQ) calibrates on; default the embedded held-out text.
    When it is the text the check scores, the check's held-out windows are left out of it (exporter/calibration.py).
    max_seq_len: the context the artifacts hold (their KV caches), instead of the recipe's; the manifest states
    the state memory it takes. The check's plan does not grow with it.
    """
    from cpm_mobile.exporter.vlm_bundle import export_vlm_bundle, is_vision_language

    # The manifest's export_cost: every stage below, timed; each stage a place an interrupt stops the export.
    progress = StageClock(interruptible(progress))
    if max_seq_len is not None:
        recipe = with_max_seq_len(recipe, max_seq_len)
    if is_vision_language(model_path):
        return export_vlm_bundle(model_path, recipe, out_dir, library_versions(), name, progress, force,
                                 calibration=calibration, context_asked=max_seq_len is not None)
    final = prepare_destination(Path(out_dir) / (name or default_bundle_name(model_path, recipe.name)), force)
    progress("load checkpoint", None)
    checkpoint = load_checkpoint(model_path)
    tokenizer = TextTokenizer.from_folder(checkpoint.folder)
    config = checkpoint.config
    tokenizer.check_fits(config.vocab_size, checkpoint.files.config)
    preflight(recipe, config, checkpoint.tied, checkpoint.files.config)
    heldout_text = read_heldout(heldout)
    plan = build_plan(recipe, tokenizer, heldout_text, recipe.max_seq_len, config.eos_token_ids,
                      heldout or HELDOUT_TEXT)
    if calibration is not None and recipe.calibration is None:
        from cpm_mobile.recipes.schema import load_recipe, recipe_names

        calibrated = ", ".join(n for n in recipe_names() if load_recipe(n).calibration is not None)
        raise InputError(calibration, f"recipe {recipe.name} has no calibration step (recipes with one: {calibrated})")
    # Read before any work when the recipe calibrates (a failed fidelity gate's suggestions may calibrate too).
    calibration_input = (calibration_text(calibration, heldout_text, plan.heldout_windows)
                         if recipe.calibration is not None else None)
    reference = build_model(checkpoint, max_seq_len=recipe.max_seq_len)
    # What the targets export: the reference itself, or (a calibration recipe) the reference with its linears on
    # the calibrated grid. The fidelity gate measures every artifact against the reference either way.
    source, grid = reference, None
    if calibration_input is not None:
        grid = calibrate_for_recipe(reference, recipe, tokenizer, calibration_input, progress)
        source = calibrated_model(reference, grid)
    name = final.name
    context = ExportContext(
        bos_id=tokenizer.bos_id if tokenizer.bos_id is not None else config.bos_token_id,
        eos_ids=config.eos_token_ids,
    )
    with staging_folder(final) as staging:
        artifacts, models, targets = [], {}, {}
        for target_name, spec in recipe.targets.items():
            # Passes return variants and targets never mutate their input: the reference stays plain.
            models[target_name] = apply_passes(source, [*recipe.passes, *spec.passes], target_name)
            targets[target_name] = get_target(target_name)
            progress(f"export {target_name}", None)
            exported = targets[target_name].export(models[target_name], staging, spec, context,
                                                   _prefixed(progress, target_name))
            artifacts.append(asdict(exported.info))
        tokenizer_files = tokenizer.write_bundle_files(staging, recipe.max_seq_len)
        if grid is not None:  # for `cpm-mobile check`, which rebuilds the ExecuTorch twin from it
            save_grid(grid, staging / GRID_FILE)
        # The tokenizer gate: what each stock client loads (named in its artifact's metadata.tokenizer), then
        # each client's own tokenizer on the gate's texts against the checkpoint's (exporter/tokenizer_gate.py).
        tokenizer_files += write_client_files(tokenizer, staging, artifacts)
        progress("check: the apps' tokenizers", None)
        gate = run_gate(tokenizer, staging, artifacts, gate_texts(tokenizer, heldout_text, recipe.check.prompts))
        # The twins as `cpm-mobile check` builds them: from the written files, by the same function.
        twins, faults = artifact_twins(source, recipe, staging, artifacts, models, targets)
        result = check_artifacts(reference, twins, tokenizer, recipe, staging, artifacts, plan, progress, faults,
                                 tokenizer_gate=gate)
        if _fidelity_failed(result.report):
            # Which recipe would pass, measured on eager twins (exporter/estimate.py), for the failure's verdict.
            from cpm_mobile.exporter.estimate import suggest

            text = calibration_input or calibration_text(calibration, heldout_text, plan.heldout_windows)
            result.report["suggestion"] = suggest(reference, recipe, plan, tokenizer, text, progress)
        manifest = {
            "format_version": FORMAT_VERSION,
            "format": BUNDLE_FORMAT,
            "name": name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # As written (defaults left out): read back, every field keeps whether the recipe set it (a grid
            # recipe refuses a group size it sets that contradicts the checkpoint, and defers to it otherwise).
            "recipe": recipe.model_dump(mode="json", exclude_unset=True),
            "source": {
                "path": str(checkpoint.folder.resolve()),
                "sha256": checkpoint.sha256(),
                "family": config.family,
                "dtypes_on_disk": checkpoint.dtypes_on_disk,
                "weight_grid": config.weight_grid.describe() if config.weight_grid is not None else None,
            },
            "model": {
                "vocab_size": config.vocab_size,
                "max_seq_len": recipe.max_seq_len,
                "num_layers": config.num_layers,
                "bos_id": tokenizer.bos_id,
                "eos_ids": list(config.eos_token_ids),
                "contract": "forward(tokens int64[1,T], input_pos int64[1]) -> logits float32[1,T,V]",
                "state_bytes": state_bytes(config, recipe.max_seq_len),
            },
            "tool": library_versions(),
            "artifacts": artifacts,
            "tokenizer": tokenizer_files,
            "export_cost": progress.cost(),
        }
        write_json(staging / REPORT, Report.model_validate(result.report).dump())
        write_json(staging / MANIFEST_SCHEMA_FILE, manifest_json_schema())
        manifest["files"] = file_hashes(staging)
        manifest = Manifest.model_validate(manifest).dump()  # the typed contract, checked before it is written
        write_json(staging / MANIFEST, manifest)
        destination = final if result.passed else final.with_name(f"{final.name}.rejected")
        publish(staging, destination)
    progress("done", 1.0)
    return ExportResult(destination, result.passed, result.report, manifest)


def with_max_seq_len(recipe: Recipe, max_seq_len: int) -> Recipe:
    """The recipe with another context length (validated as a recipe's own would be), kept in its manifest copy."""
    from pydantic import ValidationError

    try:
        return Recipe.model_validate({**recipe.model_dump(exclude_unset=True), "max_seq_len": max_seq_len})
    except ValidationError:
        raise InputError("--max-seq-len", f"{max_seq_len} is not a context length (at least 8)") from None


def _fidelity_failed(report: dict[str, Any]) -> bool:
    """Only the recipe's cost failed: every artifact is faithful to its twin, and one breached fidelity."""
    entries = report["artifacts"].values()
    return any("fidelity" in e["failed_gates"] for e in entries) and not any(
        set(e["failed_gates"]) - {"fidelity", "tokenizer"} for e in entries)


def _prefixed(progress: Progress, prefix: str) -> Progress:
    return lambda description, fraction=None: progress(f"{prefix}: {description}", fraction)
