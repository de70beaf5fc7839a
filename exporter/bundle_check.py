"""`cpm-mobile check BUNDLE`: check a published bundle again against its source checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cpm_mobile.exporter import contract
from cpm_mobile.exporter.bundle import MANIFEST, sha256_file
from cpm_mobile.exporter.calibration import GRID_FILE, calibrated_model, load_grid
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from cpm_mobile.exporter.defaults import HELDOUT_TEXT, read_heldout
from cpm_mobile.exporter.targets.base import Progress, no_progress
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.tokenizer_gate import gate_texts, run_gate
from cpm_mobile.exporter.verify import CheckResult, artifact_twins, build_plan, check_artifacts
from cpm_mobile.recipes.schema import recipe_from_dict


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest, validated against the typed contract (exporter/contract.py), as a dict."""
    return contract.read_manifest(bundle).dump()


def integrity_breaches(bundle: Path, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Files whose bytes changed since export, as breaches of the artifact that owns them.

    A missing file is bad input (exit 2); changed bytes are a failed check (exit 1), reported
    beside the numbers those bytes now produce.
    """
    breaches: dict[str, list[str]] = {}
    owners = {f: a["target"] for a in manifest["artifacts"] for f in _artifact_files(bundle, a)}
    for relative, expected in manifest["files"].items():
        path = bundle / relative
        if not path.is_file():
            raise InputError(path, "file listed in manifest.json is missing")
        if sha256_file(path) != expected:
            target = owners.get(relative, "bundle")
            breaches.setdefault(target, []).append(f"{relative}: sha256 differs from manifest.json")
    return breaches


def _artifact_files(bundle: Path, artifact: dict[str, Any]) -> list[str]:
    files = []
    for name in artifact["files"]:
        path = bundle / name
        files += [p.relative_to(bundle).as_posix() for p in path.rglob("*") if p.is_file()] if path.is_dir() else [name]
    return files


def check_bundle(
    bundle: str | Path,
    model_path: str | Path | None = None,
    heldout: Path | None = None,
    targets: list[str] | None = None,
    progress: Progress = no_progress,
) -> CheckResult:
    """Check the bundle's artifacts (or only `targets`) again; integrity first, then numbers."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    recipe = recipe_from_dict(manifest["recipe"], bundle / MANIFEST)
    artifacts = manifest["artifacts"]
    if targets is not None:
        present = [a["target"] for a in artifacts]
        missing = [t for t in targets if t not in present]
        if missing:
            raise InputError(bundle, f"bundle has no {', '.join(missing)} artifact (has {', '.join(present)})")
        artifacts = [a for a in artifacts if a["target"] in targets]
    breaches = integrity_breaches(bundle, manifest)
    source = Path(model_path or manifest["source"]["path"])
    checkpoint = load_checkpoint(source)
    if checkpoint.sha256() != manifest["source"]["sha256"]:
        raise InputError(source, "checkpoint differs from the one this bundle was exported from (sha256 mismatch)")
    if manifest.get("vision") is not None:  # a vision-language bundle: its image path's check
        from cpm_mobile.exporter.vlm_bundle import check_vlm_bundle

        progress("check: image prompts", None)
        return CheckResult(check_vlm_bundle(bundle, manifest, recipe, artifacts, checkpoint, breaches))
    tokenizer = TextTokenizer.from_folder(bundle)
    heldout_text = read_heldout(heldout)
    plan = build_plan(recipe, tokenizer, heldout_text, recipe.max_seq_len,
                      checkpoint.config.eos_token_ids, heldout or HELDOUT_TEXT)
    reference = build_model(checkpoint, max_seq_len=recipe.max_seq_len)
    # A calibration recipe's targets exported the grid export stored (its bytes are in manifest.json's files,
    # checked above); the fidelity gate stays against the reference.
    source = reference if recipe.calibration is None else calibrated_model(reference, load_grid(bundle / GRID_FILE))
    twins, faults = artifact_twins(source, recipe, bundle, artifacts)
    for target, found in faults.items():
        breaches.setdefault(target, []).extend(found)
    # The tokenizer gate: each artifact's stock client, as the manifest routes it, against the checkpoint's own
    # tokenizer (exporter/tokenizer_gate.py).
    source_tokenizer = TextTokenizer.from_folder(checkpoint.folder)
    progress("check: the apps' tokenizers", None)
    gate = run_gate(source_tokenizer, bundle, artifacts, gate_texts(source_tokenizer, heldout_text, recipe.check.prompts))
    result = check_artifacts(reference, twins, tokenizer, recipe, bundle, artifacts, plan, progress, breaches,
                             tokenizer_gate=gate)
    if "bundle" in breaches:
        result.report["passed"] = False
        result.report["bundle_breaches"] = breaches["bundle"]
    return result
