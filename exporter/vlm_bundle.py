"""A vision-language checkpoint (MiniCPM-V 4.6 / 4.7) -> a checked bundle with its image path.

    checkpoint -> text model + vision encoder -> the target's multimodal artifact -> check -> bundle

The bundle holds the artifact, the tokenizer files (with the image special tokens), the chat
template, processor_config.json as the checkpoint has it, and a manifest whose `vision` block is
the image path's contract (contract.VisionContract). The check runs, for each check image (sizes
that take the overview-only, 1x2 and 2x3 slicing branches), every slice through the artifact's
vision encoder against the eager one, and the whole pipeline (image prompt through the chat
template, prefill from embeddings, greedy continuation) teacher-forced against the eager halves.

Targets with an `export_multimodal` (ExecuTorch: the MultimodalRunner layout) so far; the others are
refused by name before any work.
"""
from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from cpm_mobile.exporter.bundle import (
    ExportResult, default_bundle_name, file_hashes, prepare_destination, publish, staging_folder, write_json,
)
from cpm_mobile.exporter.contract import (
    BUNDLE_FORMAT, FORMAT_VERSION, MANIFEST_FILE, MANIFEST_SCHEMA_FILE, REPORT_FILE, Manifest, Report, VisionContract,
    manifest_json_schema,
)
from cpm_mobile.exporter.generate import ChatTemplate
from cpm_mobile.exporter.spread import loosened, twin_spread
from cpm_mobile.exporter.vlm_generate import encode_conversation
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.checkpoint import find_files
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from cpm_mobile.exporter.models.vision import VISION_MODEL_TYPES, load_vision_encoder
from cpm_mobile.exporter.targets.base import ExportContext, Progress, no_progress
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.exporter.tokenizer import TextTokenizer, read_json_object
from cpm_mobile.recipes.schema import Recipe
from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, judge, teacher_forced_runs
from cpm_mobile.runtimes.image_slicing import TOKEN_NAMES, SliceSettings, slice_image
from cpm_mobile.runtimes.metrics import sqnr_db
from cpm_mobile.runtimes.multimodal import ImagePrompts, TorchMultimodalSession, open_multimodal_session

PROCESSOR_CONFIG = "processor_config.json"
LEGACY_PROCESSOR_CONFIG = "preprocessor_config.json"
MODEL_CONTRACT = ("vision_encoder(image float32[1,3,H,W]) -> [1,N,hidden]; token_embedding(tokens int64[1,T]) -> "
                  "[1,T,hidden]; text_decoder(embeddings float32[1,T,hidden], input_pos int64[1]) -> logits")
# A MiniCPM-V prompt holds up to 9 slices + the overview of up to 64 tokens each at 448 px: the LLM needs room.
MIN_MAX_SEQ_LEN = 1024
# Check images: one overview only, a 1x2 grid, a 2x3 grid (sides / aspect ratios the slicing treats differently).
CHECK_IMAGE_SIZES = ((448, 448), (600, 900), (896, 1344))
CHECK_NEW_TOKENS = 16


def is_vision_language(path: str | Path) -> bool:
    files = find_files(path)
    try:
        return json.loads(Path(files.config).read_text()).get("model_type") in VISION_MODEL_TYPES
    except (OSError, json.JSONDecodeError):
        return False  # the text loader reports a bad config.json with its own message


@dataclass(frozen=True)
class ImagePath:
    """How images enter the prompt: the processor's settings and the tokenizer's image special tokens."""

    settings: SliceSettings
    processor: dict[str, Any]
    tokens: dict[str, str]
    image_token_id: int

    @classmethod
    def from_folder(cls, folder: Path, tokenizer: TextTokenizer) -> "ImagePath":
        path = folder / PROCESSOR_CONFIG
        if path.is_file():
            processor = read_json_object(path).get("image_processor")
        elif (folder / LEGACY_PROCESSOR_CONFIG).is_file():
            path = folder / LEGACY_PROCESSOR_CONFIG
            processor = read_json_object(path)
        else:
            raise InputError(folder, f"a vision-language checkpoint needs {PROCESSOR_CONFIG} (its image processor)")
        if not isinstance(processor, dict):
            raise InputError(path, "has no 'image_processor' settings")
        config_path = folder / "tokenizer_config.json"
        config = read_json_object(config_path)
        missing = [name for name in TOKEN_NAMES if not isinstance(config.get(name), str)]
        if missing:
            raise InputError(config_path, f"names no image special tokens {', '.join(missing)}")
        tokens = {name: config[name] for name in TOKEN_NAMES}
        image_token_id = tokenizer.tokenizer.token_to_id(tokens["image_token"])
        if image_token_id is None:
            raise InputError(config_path, f"image_token {tokens['image_token']!r} is not in tokenizer.json")
        return cls(SliceSettings.from_processor_config(processor), processor, tokens, image_token_id)

    def prompt(self, template_render, tokenizer: TextTokenizer, image: Image.Image, text: str) -> tuple[list[int], list[np.ndarray]]:
        """Token ids and slices of one user message holding the image then `text`, the assistant turn opened."""
        sliced = slice_image(image, self.settings)
        ids = encode_conversation(template_render, tokenizer.tokenizer, [{"role": "user", "content": text}], sliced,
                                  self.settings, self.tokens)
        return ids, sliced.arrays()


def check_image(height: int, width: int) -> Image.Image:
    """A deterministic image with structure at every scale: gradients, a checkerboard, and noise."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(height * 7919 + width).integers(0, 64, (height, width, 3))
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 200 * (((x // 32) + (y // 32)) % 2)
    pixels = np.stack([red, green, blue], axis=-1) * 0.75 + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class ImageCheck:
    """The check's eager side, computed once for every target: the reference's greedy runs on the image prompts
    and its slice features. `entry` then holds one artifact to both gates: faithfulness against the target's twin
    (the text model as the artifact computes it: Core ML's fp16 states), fidelity against the fp32 reference; the
    artifact runs the reference's greedy tokens, teacher-forced."""

    def __init__(self, eager: TorchMultimodalSession, image_token_id: int,
                 prompts: dict[tuple[int, ...], list[np.ndarray]], stop_ids: tuple[int, ...]):
        self.eager, self.image_token_id, self.prompts = eager, image_token_id, prompts
        self.plan = CheckPlan(prompts=[list(p) for p in prompts], max_new_tokens=CHECK_NEW_TOKENS, stop_ids=stop_ids)
        self.eager_prompts = ImagePrompts(eager, image_token_id, prompts)
        self.reference = greedy_runs(self.eager_prompts, self.plan)

    def _on(self, session, shared_features: bool = False) -> ImagePrompts:
        """The prompts on `session`; shared_features: it runs the eager vision encoder, whose features are kept."""
        features = self.eager_prompts.features if shared_features else None
        return ImagePrompts(session, self.image_token_id, self.prompts, features)

    def entry(self, twin: tuple[nn.Module, str], artifact_session, spec, entry: str) -> dict[str, Any]:
        twin_model, twin_description = twin
        twin_session = (self.eager if twin_model is self.eager.model
                        else TorchMultimodalSession(twin_model, self.eager.vision))  # every format's tower is fp32

        def twin_prompts() -> ImagePrompts:
            return self._on(twin_session, shared_features=True)

        expected = (self.reference if twin_session is self.eager
                    else teacher_forced_runs(twin_prompts(), self.plan, self.reference))
        artifact = self._on(artifact_session)
        observed = teacher_forced_runs(artifact, self.plan, self.reference)
        worst_rel, worst_sqnr = 0.0, float("inf")
        for slices in self.prompts.values():
            for pixels in slices:  # both sides' features as the prompts above used them: no slice encoded twice
                eager_features, features = self.eager_prompts.encode(pixels), artifact.encode(pixels)
                worst_rel = max(worst_rel, float(np.abs(features - eager_features).max() / np.abs(eager_features).max()))
                worst_sqnr = min(worst_sqnr, sqnr_db(eager_features, features))
        vision = {"vision_max_rel": worst_rel, "vision_sqnr_db": worst_sqnr,
                  "vision_slices": sum(len(s) for s in self.prompts.values())}
        faithfulness = self._gate(twin_description, expected, observed, spec.faithfulness, vision, twin_model,
                                  twin_prompts)
        fidelity = self._gate("fp32 reference", self.reference, observed, spec.fidelity, vision, twin_model,
                              twin_prompts)
        breaches = ([f"faithfulness: {b}" for b in faithfulness["breaches"]]
                    + [f"fidelity: {b}" for b in fidelity["breaches"]])
        return {
            "entry": entry, "verified": artifact_session.verified, "precision": spec.precision, "quantization": None,
            "faithfulness": faithfulness, "fidelity": fidelity, "breaches": breaches,
            "failed_gates": [g for g, r in (("faithfulness", faithfulness), ("fidelity", fidelity)) if not r["passed"]],
            "passed": not breaches,
        }

    def _gate(self, against: str, expected, observed, tolerances, vision: dict[str, float], twin_model: nn.Module,
              twin_prompts) -> dict[str, Any]:
        """A gate as the text check judges it (exporter/verify.py): the stated bounds, loosened to the twin's own
        spread where the recipe asks (Core ML's fp16 states round CPU-dependent last-bit differences), and the
        vision encoder's features held to the stated max_rel_logits / min_sqnr_db."""
        stated = bounds = tolerances.model_dump(exclude={"spread"})
        spread = None
        if tolerances.spread is not None:
            metrics = twin_spread(twin_model, expected, self.plan, self.reference, tolerances.spread,
                                  tolerances.tie_margin_rel, session=twin_prompts)
            spread = {"metrics": metrics, "stated": bounds, **tolerances.spread.model_dump()}
            bounds = loosened(bounds, metrics, tolerances.spread.margin_db)
        metrics = compare(expected, observed, self.plan, tolerances.tie_margin_rel or 0.0)
        metrics.update(vision)
        breaches = judge(metrics, {k: v for k, v in bounds.items() if k != "max_ppl_rel_delta"})
        breaches += [f"vision encoder: {line}" for line in judge(
            {"max_rel_logits": vision["vision_max_rel"], "sqnr_db": vision["vision_sqnr_db"]},
            {k: stated.get(k) for k in ("max_rel_logits", "min_sqnr_db")})]  # the spread is the LLM's, not the tower's
        return {"against": against, "metrics": metrics, "tolerances": bounds,
                **({"spread": spread} if spread is not None else {}), "breaches": breaches, "passed": not breaches}


@dataclass
class CheckSetup:
    """What export and `cpm-mobile check` both build from the checkpoint: the eager halves and the image prompts."""

    vision: Any
    image_path: ImagePath
    reference: Any
    prompts: dict[tuple[int, ...], list[np.ndarray]]

    @classmethod
    def build(cls, checkpoint, tokenizer: TextTokenizer, recipe: Recipe) -> "CheckSetup":
        folder = checkpoint.folder
        image_path = ImagePath.from_folder(folder, tokenizer)
        template = tokenizer.chat_template()
        if not template:
            raise InputError(folder / "tokenizer_config.json", "has no chat template: an image prompt needs one")
        vision = load_vision_encoder(folder, image_path.settings.downsample_mode)
        step = vision.config.side_multiple(vision.mode)
        if step != image_path.settings.patch_size * image_path.settings.merge_factor:
            raise InputError(folder / PROCESSOR_CONFIG, f"patch_size {image_path.settings.patch_size} and "
                             f"downsample_mode {image_path.settings.downsample_mode} do not match the vision "
                             f"tower's {step} px fold")
        reference = build_model(checkpoint, max_seq_len=max(recipe.max_seq_len, MIN_MAX_SEQ_LEN))
        specials = {k: v for k, v in tokenizer.config.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}
        render = ChatTemplate(template, specials).render
        prompts = {}
        for height, width in CHECK_IMAGE_SIZES:
            ids, slices = image_path.prompt(render, tokenizer, check_image(height, width), recipe.check.prompts[0])
            prompts[tuple(ids)] = slices
        return cls(vision, image_path, reference, prompts)

    def check(self, stop_ids: tuple[int, ...]) -> ImageCheck:
        return ImageCheck(TorchMultimodalSession(self.reference, self.vision), self.image_path.image_token_id,
                          self.prompts, stop_ids)


def check_vlm_bundle(bundle: Path, manifest: dict[str, Any], recipe: Recipe, artifacts: list[dict[str, Any]],
                     checkpoint, breaches: dict[str, list[str]]) -> dict[str, Any]:
    """`cpm-mobile check` of a vision-language bundle: the export's check again, on the bundle's files."""
    tokenizer = TextTokenizer.from_folder(checkpoint.folder)
    setup = CheckSetup.build(checkpoint, tokenizer, recipe)
    check = setup.check(tuple(checkpoint.config.eos_token_ids))
    reports = {}
    for artifact in artifacts:
        spec = recipe.targets[artifact["target"]]
        twin = get_target(artifact["target"]).twin(setup.reference, spec, bundle, artifact)
        reports[artifact["target"]] = check.entry(twin, open_multimodal_session(bundle, artifact), spec,
                                                  artifact["entry"])
        for line in breaches.get(artifact["target"], []):
            reports[artifact["target"]]["breaches"].append(line)
            reports[artifact["target"]]["passed"] = False
    report = _report(reports, check, tokenizer, recipe)
    if "bundle" in breaches:
        report["passed"] = False
        report["bundle_breaches"] = breaches["bundle"]
    return report


def _report(reports: dict[str, Any], check: ImageCheck, tokenizer: TextTokenizer, recipe: Recipe) -> dict:
    plan = check.plan
    return {
        "format_version": FORMAT_VERSION, "passed": all(r["passed"] for r in reports.values()), "artifacts": reports,
        "reference": {"runtime": "PyTorch eager (fp32)", "host": platform.platform(),
                      "greedy_samples": [{"prompt": f"<image {h}x{w}> {recipe.check.prompts[0]}",
                                          "continuation": tokenizer.tokenizer.decode(run.generated)}
                                         for (h, w), run in zip(CHECK_IMAGE_SIZES, check.reference.runs)]},
        "plan": {"prompts": len(plan.prompts), "max_new_tokens": plan.max_new_tokens,
                 "stop_ids": list(plan.stop_ids), "heldout_windows": 0, "heldout_tokens": 0},
    }


def multimodal_targets(recipe: Recipe) -> list[str]:
    return [name for name in recipe.targets if hasattr(get_target(name), "export_multimodal")]


def export_vlm_bundle(model_path: str | Path, recipe: Recipe, out_dir: str | Path, tool: dict[str, str],
                      name: str | None = None, progress: Progress = no_progress, force: bool = False,
                      max_side: int | None = None) -> ExportResult:
    capable = multimodal_targets(recipe)
    refused = [t for t in recipe.targets if t not in capable]
    if refused:
        raise InputError(model_path, f"vision-language export supports {', '.join(capable) or 'no target'} of this "
                         f"recipe so far, not {', '.join(refused)} (choose with --target)")
    if recipe.calibration is not None or any(spec.quantization is not None for spec in recipe.targets.values()):
        raise InputError(model_path, f"vision-language export supports the fp32 recipe so far, not {recipe.name}")
    final = prepare_destination(Path(out_dir) / (name or default_bundle_name(model_path, recipe.name)), force)
    progress("load checkpoint", None)
    checkpoint = load_checkpoint(model_path)
    config, folder = checkpoint.config, checkpoint.folder
    tokenizer = TextTokenizer.from_folder(folder)
    tokenizer.check_fits(config.vocab_size, checkpoint.files.config)
    setup = CheckSetup.build(checkpoint, tokenizer, recipe)
    vision, image_path, reference = setup.vision, setup.image_path, setup.reference
    max_side = max_side or 2 * image_path.settings.scale_resolution
    step = vision.config.side_multiple(vision.mode)
    context = ExportContext(bos_id=tokenizer.bos_id, eos_ids=config.eos_token_ids)
    check = setup.check(tuple(config.eos_token_ids))
    with staging_folder(final) as staging:
        artifacts, reports = [], {}
        for target_name, spec in recipe.targets.items():
            progress(f"export {target_name}", None)
            target = get_target(target_name)
            artifact = target.export_multimodal(reference, vision, staging, spec, context, max_side)
            progress(f"check {target_name}", None)
            reports[target_name] = check.entry(target.twin(reference, spec, staging, artifact),
                                               open_multimodal_session(staging, artifact), spec, artifact["entry"])
            artifacts.append(artifact)
        tokenizer_files = tokenizer.write_bundle_files(staging, reference.max_seq_len)
        if (folder / PROCESSOR_CONFIG).is_file():
            shutil.copy2(folder / PROCESSOR_CONFIG, staging / PROCESSOR_CONFIG)
        else:
            write_json(staging / PROCESSOR_CONFIG, {"image_processor": image_path.processor})
        tokenizer_files.append(PROCESSOR_CONFIG)
        passed = all(r["passed"] for r in reports.values())
        contract = VisionContract(
            image_token_id=image_path.image_token_id, tokens=image_path.tokens, processor=image_path.processor,
            patch_size=image_path.settings.patch_size, tokens_divisor=image_path.settings.tokens_divisor,
            side_multiple=step, max_side=step * (max_side // step), hidden_size=config.hidden_size,
            placeholder="[image_id_start i image_id_end] image_start {overview run} image_end "
                        "(slice_start {slice run} slice_end)* per row, rows joined by \\n")
        report = _report(reports, check, tokenizer, recipe)
        manifest = {
            "format_version": FORMAT_VERSION, "format": BUNDLE_FORMAT, "name": final.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe.model_dump(mode="json", exclude_unset=True),
            "source": {"path": str(folder.resolve()), "sha256": checkpoint.sha256(), "family": config.family,
                       "dtypes_on_disk": checkpoint.dtypes_on_disk},
            "model": {"vocab_size": config.vocab_size, "max_seq_len": reference.max_seq_len,
                      "num_layers": config.num_layers, "bos_id": tokenizer.bos_id, "eos_ids": list(config.eos_token_ids), "contract": MODEL_CONTRACT},
            "tool": tool, "artifacts": artifacts, "tokenizer": tokenizer_files, "vision": contract.model_dump(),
        }
        write_json(staging / REPORT_FILE, Report.model_validate(report).dump())
        write_json(staging / MANIFEST_SCHEMA_FILE, manifest_json_schema())
        manifest["files"] = file_hashes(staging)
        manifest = Manifest.model_validate(manifest).dump()
        write_json(staging / MANIFEST_FILE, manifest)
        destination = final if passed else final.with_name(f"{final.name}.rejected")
        publish(staging, destination)
    progress("done", 1.0)
    return ExportResult(destination, passed, report, manifest)
