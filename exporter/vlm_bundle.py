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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch import nn

from cpm_mobile.exporter.bundle import (
    ExportResult, default_bundle_name, file_hashes, interruptible, prepare_destination, publish, staging_folder,
    write_json,
)
from cpm_mobile.exporter.contract import (
    BUNDLE_FORMAT, FORMAT_VERSION, MANIFEST_FILE, MANIFEST_SCHEMA_FILE, REPORT_FILE, Manifest, Report, VisionContract,
    manifest_json_schema,
)
from cpm_mobile.exporter.generate import ChatTemplate
from cpm_mobile.exporter.spread import loosened, twin_spread
from cpm_mobile.exporter.vlm_generate import encode_conversation
from cpm_mobile.exporter.calibration import (
    GRID_FILE, calibrate_for_recipe, calibrated_model, calibration_text, load_grid, save_grid,
)
from cpm_mobile.exporter.defaults import read_heldout
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.export_cost import StageClock
from cpm_mobile.exporter.models.vision_grid import gridded, vision_grid
from cpm_mobile.exporter.preflight import preflight
from cpm_mobile.exporter.sizes import state_bytes
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
# A MiniCPM-V prompt holds up to max_slice_nums slices + the overview, each about scale_resolution^2 pixels
# (64 tokens at 448 px and 16x; 256 at 4x): the LLM needs room for them and the conversation's text.
MIN_MAX_SEQ_LEN = 1024
TEXT_ROOM = 512
# Check images: one overview only, a 1x2 grid, a 2x3 grid (sides / aspect ratios the slicing treats differently).
CHECK_IMAGE_SIZES = ((448, 448), (600, 900), (896, 1344))
CHECK_NEW_TOKENS = 16
VISION_GRID_FILE = "vision_grid.safetensors"
# The vision encoder against its twin in an fp32 format: fp32 summation order only. Measured 6.5e-7 .. 8.3e-7
# max rel, 124-128 dB on the 3-layer test tower (tests/test_minicpmv.py, fp32 and vlm-int4), 111 / 118 dB (.pte /
# .onnx) on the 12 x 768 tower of bench.vlm's small preset (bench/reports/vlm-int4 "checks"): 20 dB of headroom
# there. One flipped code of the 8-bit grid: 62 dB, rel 1.3e-3 on the test tower; a single code weighs less in a
# 27 x 1152 tower, a wrong kernel (scale dtype, zero point, layout) touches every weight and stays far outside.
FP32_VISION_BOUNDS = {"max_rel_logits": 2e-5, "min_sqnr_db": 90.0}


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

    def with_slicing(self, slicing) -> "ImagePath":
        """The image path as a recipe's `slicing` (recipes/schema.SlicingSpec) declares it for the bundle."""
        if slicing is None:
            return self
        processor = dict(self.processor)
        if slicing.grid != "minicpmv":
            processor.update(grid_rule=slicing.grid, relaxed_alpha=slicing.relaxed_alpha)
        if slicing.downsample_mode is not None:
            processor["downsample_mode"] = slicing.downsample_mode
        return ImagePath(SliceSettings.from_processor_config(processor), processor, self.tokens, self.image_token_id)

    def prompt(self, template_render, tokenizer: TextTokenizer, image: Image.Image, text: str) -> tuple[list[int], list[np.ndarray]]:
        """Token ids and slices of one user message holding the image then `text`, the assistant turn opened."""
        sliced = slice_image(image, self.settings)
        ids = encode_conversation(template_render, tokenizer.tokenizer, [{"role": "user", "content": text}], sliced,
                                  self.settings, self.tokens)
        return ids, sliced.arrays()


def min_max_seq_len(settings: SliceSettings) -> int:
    """The context an image prompt needs: every slice of the largest image at full size, and TEXT_ROOM."""
    per_slice = (settings.scale_resolution // settings.patch_size) ** 2 // settings.tokens_divisor
    return max(MIN_MAX_SEQ_LEN, (settings.max_slice_nums + 1) * per_slice + TEXT_ROOM)


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

    def _on(self, session, features: dict | None = None) -> ImagePrompts:
        """The prompts on `session`; features: another ImagePrompts' slice features from the same vision encoder."""
        return ImagePrompts(session, self.image_token_id, self.prompts, features)

    def entry(self, twin: tuple[nn.Module, str], artifact_session, spec, entry: str,
              twin_vision: nn.Module | None = None) -> dict[str, Any]:
        """twin_vision: the vision encoder as the artifact stores it (the recipe's vision grid), default the fp32
        one. Faithfulness holds the artifact's slice features to it, fidelity to the fp32 encoder's."""
        twin_model, twin_description = twin
        twin_vision = self.eager.vision if twin_vision is None else twin_vision
        exact_twin = twin_model is self.eager.model and twin_vision is self.eager.vision
        twin_session = self.eager if exact_twin else TorchMultimodalSession(twin_model, twin_vision)
        # one set of twin features for the gate and its spread (the eager ones where the twin's tower is fp32)
        shared_twin = self._on(twin_session, self.eager_prompts.features if twin_vision is self.eager.vision else None)

        def twin_prompts() -> ImagePrompts:  # what the spread runs (noise goes into the twin's decoder)
            return self._on(twin_session, shared_twin.features)

        expected = (self.reference if exact_twin else teacher_forced_runs(shared_twin, self.plan, self.reference))
        artifact = self._on(artifact_session)
        observed = teacher_forced_runs(artifact, self.plan, self.reference)
        against_twin, against_fp32 = _FeatureGap(), _FeatureGap()
        for slices in self.prompts.values():
            for pixels in slices:  # every side's features as the prompts above used them: no slice encoded twice
                features = artifact.encode(pixels)
                against_fp32.add(self.eager_prompts.encode(pixels), features)
                against_twin.add(shared_twin.encode(pixels), features)
        slices = sum(len(s) for s in self.prompts.values())
        # An fp32 format computes its twin's tower exactly (fp32, or the vision grid with fp32 activations) whatever
        # the LLM's bounds are: held to fp32 rounding, not to a quantised LLM's statistical bounds.
        exact_tower = FP32_VISION_BOUNDS if spec.precision == "fp32" else None
        faithfulness = self._gate(twin_description, expected, observed, spec.faithfulness,
                                  against_twin.metrics(slices), twin_model, twin_prompts, exact_tower)
        fidelity = self._gate("fp32 reference", self.reference, observed, spec.fidelity,
                              against_fp32.metrics(slices), twin_model, twin_prompts)
        breaches = ([f"faithfulness: {b}" for b in faithfulness["breaches"]]
                    + [f"fidelity: {b}" for b in fidelity["breaches"]])
        return {
            "entry": entry, "verified": artifact_session.verified, "precision": spec.precision,
            "quantization": spec.quantization.model_dump() if spec.quantization is not None else None,
            "faithfulness": faithfulness, "fidelity": fidelity, "breaches": breaches,
            "failed_gates": [g for g, r in (("faithfulness", faithfulness), ("fidelity", fidelity)) if not r["passed"]],
            "passed": not breaches,
        }

    def _gate(self, against: str, expected, observed, tolerances, vision: dict[str, float], twin_model: nn.Module,
              twin_prompts: Callable[[], ImagePrompts], vision_bounds: dict[str, float] | None = None) -> dict[str, Any]:
        """A gate as the text check judges it (exporter/verify.py): the stated bounds, loosened to the twin's own
        spread where the recipe asks (Core ML's fp16 states round CPU-dependent last-bit differences), and the
        vision encoder's features held to the stated max_rel_logits / min_sqnr_db, or to `vision_bounds`."""
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
            vision_bounds or {k: stated.get(k) for k in ("max_rel_logits", "min_sqnr_db")})]  # not the LLM's spread
        return {"against": against, "metrics": metrics, "tolerances": bounds,
                **({"spread": spread} if spread is not None else {}), "breaches": breaches, "passed": not breaches}


class _FeatureGap:
    """The worst slice's max relative error and SQNR of features against reference features."""

    def __init__(self):
        self.max_rel, self.sqnr = 0.0, float("inf")

    def add(self, reference: np.ndarray, features: np.ndarray) -> None:
        self.max_rel = max(self.max_rel, float(np.abs(features - reference).max() / np.abs(reference).max()))
        self.sqnr = min(self.sqnr, sqnr_db(reference, features))

    def metrics(self, slices: int) -> dict[str, float]:
        return {"vision_max_rel": self.max_rel, "vision_sqnr_db": self.sqnr, "vision_slices": slices}


@dataclass
class CheckSetup:
    """What export and `cpm-mobile check` both build from the checkpoint: the eager halves and the image prompts."""

    vision: Any
    image_path: ImagePath
    reference: Any
    prompts: dict[tuple[int, ...], list[np.ndarray]]

    @classmethod
    def build(cls, checkpoint, tokenizer: TextTokenizer, recipe: Recipe, context_asked: bool = False) -> "CheckSetup":
        """context_asked: the recipe's max_seq_len is the user's (`--max-seq-len`), refused when shorter than an
        image prompt needs; a recipe's own is raised to that instead."""
        folder = checkpoint.folder
        image_path = ImagePath.from_folder(folder, tokenizer).with_slicing(recipe.slicing)
        needed = min_max_seq_len(image_path.settings)
        if context_asked and recipe.max_seq_len < needed:
            raise InputError("--max-seq-len", f"{recipe.max_seq_len} is shorter than an image prompt of this "
                                              f"checkpoint's slicing needs ({needed})")
        template = tokenizer.chat_template()
        if not template:
            raise InputError(folder / "tokenizer_config.json", "has no chat template: an image prompt needs one")
        vision = load_vision_encoder(folder, image_path.settings.downsample_mode)
        step = vision.config.side_multiple(vision.mode)
        if step != image_path.settings.patch_size * image_path.settings.merge_factor:
            raise InputError(folder / PROCESSOR_CONFIG, f"patch_size {image_path.settings.patch_size} and "
                             f"downsample_mode {image_path.settings.downsample_mode} do not match the vision "
                             f"tower's {step} px fold")
        reference = build_model(checkpoint, max_seq_len=max(recipe.max_seq_len, needed))
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
    """`cpm-mobile check` of a vision-language bundle: the export's check again, on the bundle's files (the
    twins from the grids the bundle stores)."""
    tokenizer = TextTokenizer.from_folder(checkpoint.folder)
    setup = CheckSetup.build(checkpoint, tokenizer, recipe)
    check = setup.check(tuple(checkpoint.config.eos_token_ids))
    source = setup.reference if recipe.calibration is None else calibrated_model(setup.reference,
                                                                                  load_grid(bundle / GRID_FILE))
    twin_vision = None if recipe.vision is None else gridded(setup.vision, load_grid(bundle / VISION_GRID_FILE))
    reports = {}
    for artifact in artifacts:
        spec = recipe.targets[artifact["target"]]
        twin = get_target(artifact["target"]).twin(source, spec, bundle, artifact)
        reports[artifact["target"]] = check.entry(twin, open_multimodal_session(bundle, artifact), spec,
                                                  artifact["entry"], twin_vision)
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


def _refusals(model_path: str | Path, recipe: Recipe) -> None:
    """What vision-language export cannot do with this recipe, before any work."""
    capable = multimodal_targets(recipe)
    refused = [t for t in recipe.targets if t not in capable]
    if refused:
        raise InputError(model_path, f"vision-language export supports {', '.join(capable) or 'no target'} of this "
                         f"recipe so far, not {', '.join(refused)} (choose with --target)")
    quantised = [name for name, spec in recipe.targets.items()
                 if not get_target(name).multimodal_quantised
                 and (spec.quantization is not None or recipe.vision is not None or recipe.calibration is not None)]
    if quantised:
        raise InputError(model_path, f"recipe {recipe.name}: vision-language export does not quantise for "
                         f"{', '.join(quantised)} yet (choose other targets with --target)")
    sparse = [name for name, spec in recipe.targets.items() if spec.passes] + (["all"] if recipe.passes else [])
    if sparse:
        raise InputError(model_path, f"recipe {recipe.name}: vision-language export runs no graph passes "
                         f"(targets {', '.join(sparse)})")


def export_vlm_bundle(model_path: str | Path, recipe: Recipe, out_dir: str | Path, tool: dict[str, str],
                      name: str | None = None, progress: Progress = no_progress, force: bool = False,
                      max_side: int | None = None, calibration: Path | None = None,
                      context_asked: bool = False) -> ExportResult:
    """calibration: the text the recipe's GPTQ step calibrates the LLM on (default the embedded held-out text;
    the vision-language check scores no held-out text, so none of it is reserved). context_asked: see
    CheckSetup.build."""
    _refusals(model_path, recipe)
    if not isinstance(progress, StageClock):
        progress = StageClock(interruptible(progress))
    final = prepare_destination(Path(out_dir) / (name or default_bundle_name(model_path, recipe.name)), force)
    calibration_input = (calibration_text(calibration, read_heldout(None), [])
                         if recipe.calibration is not None else None)
    progress("load checkpoint", None)
    checkpoint = load_checkpoint(model_path)
    config, folder = checkpoint.config, checkpoint.folder
    tokenizer = TextTokenizer.from_folder(folder)
    tokenizer.check_fits(config.vocab_size, checkpoint.files.config)
    preflight(recipe, config, checkpoint.tied, checkpoint.files.config, vision_language=True)
    setup = CheckSetup.build(checkpoint, tokenizer, recipe, context_asked)
    vision, image_path, reference = setup.vision, setup.image_path, setup.reference
    max_side = max_side or 2 * image_path.settings.scale_resolution
    step = vision.config.side_multiple(vision.mode)
    context = ExportContext(bos_id=tokenizer.bos_id, eos_ids=config.eos_token_ids)
    # What the targets store: the LLM on the recipe's calibrated grid, the vision encoder on its 8-bit grid.
    source, grid = reference, None
    if calibration_input is not None:
        grid = calibrate_for_recipe(reference, recipe, tokenizer, calibration_input, progress)
        source = calibrated_model(reference, grid)
    vision_grid_, twin_vision, fp32_linears = None, None, []
    if recipe.vision is not None:
        vision_grid_, fp32_linears = vision_grid(vision, recipe.vision.bits, recipe.vision.group_size)
        twin_vision = gridded(vision, vision_grid_)
    check = setup.check(tuple(config.eos_token_ids))
    with staging_folder(final) as staging:
        artifacts, reports = [], {}
        for target_name, spec in recipe.targets.items():
            progress(f"export {target_name}", None)
            target = get_target(target_name)
            artifact = target.export_multimodal(source, vision, staging, spec, context, max_side, vision_grid_)
            progress(f"check {target_name}", None)
            reports[target_name] = check.entry(target.twin(source, spec, staging, artifact),
                                               open_multimodal_session(staging, artifact), spec, artifact["entry"],
                                               twin_vision)
            artifacts.append(artifact)
        if grid is not None:  # for `cpm-mobile check`, which rebuilds the twins from them
            save_grid(grid, staging / GRID_FILE)
        if vision_grid_ is not None:
            save_grid(vision_grid_, staging / VISION_GRID_FILE)
        tokenizer_files = tokenizer.write_bundle_files(staging, reference.max_seq_len)
        # The checkpoint's processor_config.json with the image settings the bundle declares (a recipe's slicing).
        processor_file = read_json_object(folder / PROCESSOR_CONFIG) if (folder / PROCESSOR_CONFIG).is_file() else {}
        write_json(staging / PROCESSOR_CONFIG, {**processor_file, "image_processor": image_path.processor})
        tokenizer_files.append(PROCESSOR_CONFIG)
        passed = all(r["passed"] for r in reports.values())
        contract = VisionContract(
            image_token_id=image_path.image_token_id, tokens=image_path.tokens, processor=image_path.processor,
            patch_size=image_path.settings.patch_size, tokens_divisor=image_path.settings.tokens_divisor,
            side_multiple=step, max_side=step * (max_side // step), hidden_size=config.hidden_size,
            placeholder="[image_id_start i image_id_end] image_start {overview run} image_end "
                        "(slice_start {slice run} slice_end)* per row, rows joined by \\n")
        report = _report(reports, check, tokenizer, recipe)
        if vision_grid_ is not None:
            report["vision_quantization"] = {"grid": vision_grid_.describe(), "linears": len(vision_grid_.linears),
                                             "fp32_linears": fp32_linears}
        manifest = {
            "format_version": FORMAT_VERSION, "format": BUNDLE_FORMAT, "name": final.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe.model_dump(mode="json", exclude_unset=True),
            "source": {"path": str(folder.resolve()), "sha256": checkpoint.sha256(), "family": config.family,
                       "dtypes_on_disk": checkpoint.dtypes_on_disk},
            "model": {"vocab_size": config.vocab_size, "max_seq_len": reference.max_seq_len,
                      "num_layers": config.num_layers, "bos_id": tokenizer.bos_id, "eos_ids": list(config.eos_token_ids),
                      "contract": MODEL_CONTRACT, "state_bytes": state_bytes(config, reference.max_seq_len)},
            "tool": tool, "artifacts": artifacts, "tokenizer": tokenizer_files, "vision": contract.model_dump(),
            "export_cost": progress.cost(),
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
